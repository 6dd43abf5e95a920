"""The ``llmq`` command line and operator tools: the top layer.

It assembles the roles' commands (``llmq worker``, ``gateway``, ``submit``,
``dlq``) and holds the tools that look across roles: ``llmq status``,
``probe`` and ``demo``. Nothing imports this package but ``python -m llmq_cli``
and the console script.
"""
