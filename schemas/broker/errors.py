"""What the broker layer raises; aiormq's exceptions stop here.

::

    BrokerFailure          a confirmed publish failed (the job must not be acked)
    ├── Returned           the message came back (no queue bound / reply queue gone)
    └── Refused            the broker nacked it (the target queue is full)

    BrokerUnreachable      no address of the broker accepted a connection
                           (a ConnectionError, as aiormq's own are)

The producers translate them into their public errors (``producers.errors``):
Returned into ``Unroutable``, Refused into ``Backpressure``, the rest into
``PublishFailed``.
"""

from __future__ import annotations

__all__ = ["BrokerFailure", "BrokerUnreachable", "Refused", "Returned"]


class BrokerFailure(Exception):
    """Publishing a message with a confirm failed."""


class Returned(BrokerFailure):
    """The broker returned the message: nothing is bound to that routing key."""


class Refused(BrokerFailure):
    """The broker nacked the message: a queue it routes to refuses it (full)."""


class BrokerUnreachable(ConnectionError):
    """No address of the broker accepted a connection (each node's ``host:port`` and why)."""
