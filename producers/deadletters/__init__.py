"""The dead-letter tools behind ``llmq dlq``, one concern per module:

- ``letters``: the model, pure: what a dead letter says, filters, replay headers;
- ``queue``: the I/O: browse ``llmq.dead`` in order-keeping windows, give back;
- ``actions``: replay and purge, each removal after the broker confirmed;
- ``render``: how the commands print (plain text, never markup from a letter);
- ``command``: the ``llmq dlq`` click group.
"""
