"""Streamed upstream calls: open until the first token, then read on chunk by chunk.

:func:`open_stream` is one attempt of a streamed job, as ``Upstream.send``
is of a whole one: it returns once the first chunk that carries a token (or
finishes the answer) has arrived, within ``timeout_s``, so every failure
before the caller sees anything is an ordinary attempt failure that the
dispatcher retries or hedges. What it returns, an :class:`UpstreamStream`,
is a resource: its one owner (the stream relay) reads it to the end or
closes it; closing mid-answer drops the connection, which is how the
upstream learns to stop generating.

An endpoint that cannot stream (:attr:`Adapter.streams` false), or that
answers a streamed request with a whole JSON answer, still yields a stream:
its answer cut into chunks (:func:`~workers.providers.chunks.chunks_of`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from schemas.contract import JobKind
from workers.errors import UpstreamFailure
from workers.providers.base import Adapter
from workers.providers.chunks import Chunk, ChunkReader, chunks_of
from workers.routing import FailureKind

__all__ = [
    "Finite",
    "Opened",
    "PieceStream",
    "UpstreamStream",
    "finite",
    "is_event_stream",
    "open_body",
    "read_first",
]


class UpstreamStream(Protocol):
    """The rest of an opened stream."""

    async def next(self, timeout_s: float | None) -> list[Chunk]:
        """The next chunks, waiting at most ``timeout_s`` for them; ``[]`` at the end.
        A broken, malformed or silent stream raises ``UpstreamFailure``."""
        ...

    async def aclose(self) -> None:
        """Stop reading; mid-answer, drop the connection (the upstream stops)."""
        ...


class Opened:
    """An attempt's stream once its first token arrived: ``first`` and the rest."""

    __slots__ = ("first", "rest")

    def __init__(self, first: list[Chunk], rest: UpstreamStream) -> None:
        self.first = first
        self.rest = rest


def open_body(request: dict[str, Any], adapter: Adapter) -> dict[str, Any]:
    """The request to send for a streamed job: a stream with usage where the
    endpoint streams (usage is the bill), a whole answer where it does not."""
    if adapter.streams:
        options = request.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        return {**request, "stream": True, "stream_options": {**options, "include_usage": True}}
    return {k: v for k, v in request.items() if k not in ("stream", "stream_options")}


class _Pieces(Protocol):
    def __call__(self) -> Awaitable[bytes]: ...


class PieceStream:
    """An :class:`UpstreamStream` over a function that returns the next bytes
    (``b""`` at the end); the transport supplies it and the close.

    A read's ``timeout_s`` is kept by one loop timer per stream, not an
    ``asyncio.timeout`` per read: the timer is moved only when a read is due
    before it; when it fires early (for an earlier read), it is set again for
    the read under way. Reads come every few milliseconds and the bound is
    about a minute, so it is set about once a stream. On expiry it cancels the
    reading task and takes the cancellation back, as ``asyncio.timeout`` does.
    """

    def __init__(
        self,
        name: str,
        reader: ChunkReader,
        piece: _Pieces,
        close: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._name = name
        self._reader = reader
        self._piece = piece
        self._close = close
        self._ended = False
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0  # the loop time the timer is set for
        self._due = 0.0  # the loop time the read under way times out
        self._task: asyncio.Task[Any] | None = None  # reading now, under a bound
        self._cancelling = 0  # its cancel requests when the read began
        self._expired = False

    async def next(self, timeout_s: float | None) -> list[Chunk]:
        if self._ended:
            return []
        task = None if timeout_s is None else self._watch(timeout_s)
        try:
            while True:
                if self._reader.done:
                    self._ended = True
                    return []
                piece = await self._piece()
                if not piece:
                    self._ended = True
                    self._reader.end()
                    return []
                chunks = self._reader.feed(piece)
                if chunks:
                    return chunks
        except TimeoutError:
            raise self._timeout(timeout_s) from None
        except asyncio.CancelledError:
            if task is not None and self._expired:
                self._expired = False
                if task.uncancel() <= self._cancelling:  # no one else's cancel: ours
                    raise self._timeout(timeout_s) from None
            raise
        finally:
            if task is not None:
                self._task = None
                if self._expired:  # expired as the read ended: as asyncio.timeout does
                    self._expired = False
                    task.uncancel()

    def _timeout(self, timeout_s: float | None) -> UpstreamFailure:
        return UpstreamFailure(
            FailureKind.TIMEOUT, f"{self._name}: no chunk within {timeout_s or 0:.3g} s"
        )

    def _watch(self, timeout_s: float) -> asyncio.Task[Any]:
        """Bound the read about to begin; the task that reads."""
        task = asyncio.current_task()
        assert task is not None, "a stream is read in a task"
        loop = task.get_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self._due = due = loop.time() + timeout_s
        if self._timer is None or due < self._armed:
            if self._timer is not None:
                self._timer.cancel()
            self._armed = due
            self._timer = loop.call_at(due, self._fire)
        return task

    def _fire(self) -> None:
        self._timer = None
        task = self._task
        if task is None:
            return  # no read under way: the next one sets the timer
        if self._due > self._armed:  # set for an earlier read: now for this one
            self._armed = self._due
            self._timer = task.get_loop().call_at(self._due, self._fire)
            return
        self._expired = True
        task.cancel()

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._close(self._ended)


async def read_first(stream: UpstreamStream) -> list[Chunk]:
    """Chunks up to the first that carries a token or a finish reason (the
    caller bounds the wait: time to first token is the attempt's timeout)."""
    first: list[Chunk] = []
    while True:
        chunks = await stream.next(None)
        first += chunks
        if not chunks or any(c.tokens or c.finish_reason is not None for c in chunks):
            return first


class Finite:
    """The rest of a stream whose chunks are all known (a whole answer, cut)."""

    async def next(self, timeout_s: float | None) -> list[Chunk]:
        return []

    async def aclose(self) -> None:
        return None


def finite(adapter: Adapter, kind: JobKind, status: int, headers: Any, raw: bytes) -> Opened:
    """A whole answer (the endpoint does not stream, or ignored ``stream``) as a stream."""
    reply = adapter.answer(kind, status, headers, raw, now=time.time())
    return Opened(chunks_of(reply), Finite())


def is_event_stream(content_type: str | None) -> bool:
    return bool(content_type) and "text/event-stream" in (content_type or "").lower()
