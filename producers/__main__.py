"""``python -m producers`` runs the ``llmq`` command."""

from producers.cli import main

main()
