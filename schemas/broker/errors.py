"""What the broker layer raises; aiormq's exceptions stop here.

::

    BrokerFailure          a confirmed publish failed (the job must not be acked)
    ├── Returned           the message came back (no queue bound / reply queue gone)
    ├── Refused            the broker nacked it (the target queue is full)
    └── Rejected           the broker closed the channel on it: final, never retried
        └── TooLarge       over the broker's max_message_size

    BrokerUnreachable      no address of the broker accepted a connection
                           (a ConnectionError, as aiormq's own are)

The producers translate them into their public errors (``producers.errors``):
Returned into ``Unroutable``, Refused into ``Backpressure``, TooLarge into
``TooLarge``, the rest into ``PublishFailed``.
"""

from __future__ import annotations

__all__ = ["BrokerFailure", "BrokerUnreachable", "Refused", "Rejected", "Returned", "TooLarge"]


class BrokerFailure(Exception):
    """Publishing a message with a confirm failed."""


class Returned(BrokerFailure):
    """The broker returned the message: nothing is bound to that routing key."""


class Refused(BrokerFailure):
    """The broker nacked the message: a queue it routes to refuses it (full)."""


class Rejected(BrokerFailure):
    """The broker closed the channel on this publish (a precondition, access refused):
    sending the same message again would fail the same way."""


class TooLarge(Rejected):
    """The message is larger than the broker's ``max_message_size`` (16 MiB by default
    on RabbitMQ 4.x, 128 MiB before)."""


class BrokerUnreachable(ConnectionError):
    """No address of the broker accepted a connection (each node's ``host:port`` and why)."""
