"""Producers: the client library, the ``llmq`` CLI, the gateway and dead-letter tools."""
