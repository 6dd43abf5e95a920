"""``python -m llmq_cli`` runs the ``llmq`` command."""

from llmq_cli.main import main

main()
