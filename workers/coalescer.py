"""When a streamed job's chunks go to the broker, decided without a clock.

One broker message per token would make a fast model cost a publish (and a
confirm, and a delivery to the caller) every few milliseconds; one message
per answer would make streaming pointless. The worker's shell feeds each
upstream chunk to :meth:`Coalescer.add` with the time it arrived (monotonic
seconds, injected, so tests need no clock) and publishes the :class:`Batch`
it gets back, if any; it arms a timer for :attr:`Coalescer.deadline` and
calls :meth:`Coalescer.due` when the timer fires; at the stream's end
:meth:`Coalescer.finish` hands back the rest. The rules, in this order:

1. the first chunk that carries a token goes at once, with any held before
   it: time to first token is what a streaming caller feels. A chunk without
   a token (OpenAI's first, ``role`` only) waits for it, so the start costs
   one message, not two;
2. a batch whose oldest chunk has waited ``max_delay_s`` goes (``due``, or
   the next ``add`` when the timer was late);
3. a batch that holds ``max_tokens`` tokens, ``max_chunks`` chunks or
   ``max_bytes`` bytes goes.

The defaults of :class:`CoalescePolicy` are placeholders: issue 15 asks for
the trade-off (messages per token against added inter-chunk delay) to be
measured and the defaults chosen from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = ["Batch", "CoalescePolicy", "Coalescer", "FlushReason"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CoalescePolicy:
    """How long and how much a batch may grow. Placeholder defaults, not yet measured."""

    max_delay_s: float = 0.020
    """Longest a chunk waits for company (from the oldest unflushed chunk)."""
    max_tokens: int = 16
    max_chunks: int = 32
    """Bounds chunks that carry no token (role, tool-call headers, usage)."""
    max_bytes: int = 64 * 1024
    """Of the chunks' sizes as the caller counts them: keeps a message well
    below the broker's ``max_message_size``."""

    def __post_init__(self) -> None:
        if self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0 (got {self.max_delay_s})")
        for name in ("max_tokens", "max_chunks", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")


class FlushReason(StrEnum):
    """Why a batch goes now."""

    FIRST_TOKEN = "first_token"  # noqa: S105 - a reason, not a secret
    AGE = "age"
    FULL = "full"
    FINISH = "finish"


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """Chunks to publish as one message, in arrival order."""

    chunks: tuple[T, ...]
    reason: FlushReason
    size: int = field(default=0, compare=False)
    """The chunks' sizes added up, as given to :meth:`Coalescer.add`."""


class Coalescer(Generic[T]):
    """The batching decisions of one stream; chunks are opaque to it."""

    def __init__(self, policy: CoalescePolicy | None = None) -> None:
        self.policy = policy or CoalescePolicy()
        self._chunks: list[T] = []
        self._tokens = 0
        self._bytes = 0
        self._since: float | None = None  # arrival of the oldest unflushed chunk
        self._first_sent = False
        self._finished = False

    @property
    def deadline(self) -> float | None:
        """When the held batch must go (for the shell's timer), or None when none is held."""
        if self._since is None:
            return None
        return self._since + self.policy.max_delay_s

    def add(self, chunk: T, now: float, *, tokens: int = 1, size: int = 0) -> Batch[T] | None:
        """Take one chunk arriving at ``now``; return the batch to publish now, if any.

        Args:
            chunk: what to publish, untouched.
            now: arrival time, monotonic seconds.
            tokens: tokens it carries (0 for a ``role``-only or empty chunk).
            size: its size in bytes, as the caller counts it (0 leaves
                ``max_bytes`` out of it).
        """
        if self._finished:
            raise RuntimeError("the stream is finished: no chunk may follow")
        if self._since is None:
            self._since = now
        self._chunks.append(chunk)
        self._tokens += tokens
        self._bytes += size
        policy = self.policy
        if tokens > 0 and not self._first_sent:
            self._first_sent = True
            return self._flush(FlushReason.FIRST_TOKEN)
        if now >= self._since + policy.max_delay_s:
            return self._flush(FlushReason.AGE)
        if (
            self._tokens >= policy.max_tokens
            or len(self._chunks) >= policy.max_chunks
            or self._bytes >= policy.max_bytes
        ):
            return self._flush(FlushReason.FULL)
        return None

    def due(self, now: float) -> Batch[T] | None:
        """The held batch if its deadline has come by ``now`` (the shell's timer fired)."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        return self._flush(FlushReason.AGE)

    def finish(self) -> Batch[T]:
        """The stream ended: everything held, perhaps nothing. No chunk may follow."""
        self._finished = True
        return self._flush(FlushReason.FINISH)

    def _flush(self, reason: FlushReason) -> Batch[T]:
        batch = Batch(tuple(self._chunks), reason, self._bytes)
        self._chunks.clear()
        self._tokens = self._bytes = 0
        self._since = None
        return batch
