"""PieceStream's read bound: one loop timer per stream, kept as asyncio.timeout would be."""

from __future__ import annotations

import asyncio
import time

import pytest

from workers.errors import UpstreamFailure
from workers.providers.chunks import ChunkReader
from workers.routing import FailureKind
from workers.upstream_streams import PieceStream

EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'


class Source:
    """Pieces on demand: ``give`` hands one over; ``b""`` ends the stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.closed: list[bool] = []

    async def piece(self) -> bytes:
        return await self.queue.get()

    async def close(self, ended: bool) -> None:
        self.closed.append(ended)

    def stream(self) -> PieceStream:
        return PieceStream("e", ChunkReader("e", ()), self.piece, self.close)


async def test_each_read_has_its_own_bound() -> None:
    """Quick reads never expire a longer bound; a silent read expires its own,
    counted from when it began, and leaves no cancel request behind."""
    source = Source()
    stream = source.stream()
    loop = asyncio.get_running_loop()
    for _ in range(6):  # 0.36 s of reads in all, each waiting: past the first read's bound
        loop.call_later(0.06, source.queue.put_nowait, EVENT)
        assert len(await stream.next(0.2)) == 1
    began = time.monotonic()
    with pytest.raises(UpstreamFailure) as caught:
        await stream.next(0.1)
    waited = time.monotonic() - began
    assert caught.value.kind is FailureKind.TIMEOUT and "no chunk within 0.1 s" in str(caught.value)
    assert 0.08 <= waited < 0.5
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no stray cancellation reaches the next await
    await stream.aclose()
    assert source.closed == [False]


async def test_a_shorter_bound_after_a_longer_one_holds() -> None:
    source = Source()
    stream = source.stream()
    source.queue.put_nowait(EVENT)
    await stream.next(30)
    began = time.monotonic()
    with pytest.raises(UpstreamFailure):
        await stream.next(0.05)
    assert time.monotonic() - began < 1


async def test_a_cancel_from_outside_stays_a_cancel() -> None:
    source = Source()
    stream = source.stream()
    reading = asyncio.create_task(stream.next(10))
    await asyncio.sleep(0.01)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    source.queue.put_nowait(EVENT)  # the stream reads on after it
    assert len(await stream.next(1)) == 1


async def test_an_unbounded_read_and_the_end() -> None:
    source = Source()
    stream = source.stream()
    source.queue.put_nowait(EVENT)
    assert len(await stream.next(None)) == 1
    source.queue.put_nowait(b"")
    with pytest.raises(UpstreamFailure, match="broke off"):  # no finish reason, no [DONE]
        await stream.next(1)
    source.queue.put_nowait(EVENT.replace(b'"a"}', b'"a"}, "finish_reason": "stop"'))
    fresh = source.stream()
    assert (await fresh.next(1))[0].finish_reason == "stop"
    source.queue.put_nowait(b"")
    assert await fresh.next(1) == [] and await fresh.next(1) == []
    await fresh.aclose()
    assert source.closed == [True]
