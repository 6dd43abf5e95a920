"""The stream relay against an in-memory publisher and a scripted upstream:
parts in order, each confirmed before the next, and never bigger than the
coalescing policy's ``max_bytes`` however long a confirm takes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from schemas.broker.ports import Outgoing
from schemas.codec import Job
from workers.coalescer import CoalescePolicy
from workers.providers.chunks import Chunk
from workers.relay import StreamRelay
from workers.upstream_streams import Opened

CHUNK_BYTES = 1000


def chunk(i: int) -> Chunk:
    body = {"choices": [{"index": 0, "delta": {"content": f"{i:04d}" + "x" * 950}}]}
    return Chunk(body=body, tokens=1, size=CHUNK_BYTES)


class Upstream:
    """Hands out ``n`` chunks, one per read, then the end; sets ``closed`` on close."""

    def __init__(self, n: int, closed: asyncio.Event | None = None) -> None:
        self._left = list(range(1, n))
        self.closed = closed or asyncio.Event()

    async def next(self, timeout_s: float | None) -> list[Chunk]:
        await asyncio.sleep(0)
        return [chunk(self._left.pop(0))] if self._left else []

    async def aclose(self) -> None:
        self.closed.set()


class StallingPublisher:
    """Confirms nothing until ``release`` is set; then everything at once."""

    frame_max = 131072

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.parts: list[dict[str, Any]] = []

    async def publish(
        self, message: Outgoing, *, exchange: str, routing_key: str, timeout_s: float = 30
    ) -> None:
        await self.release.wait()
        self.parts.append(orjson.loads(message.body))


def job() -> Job:
    now_ms = int(time.time() * 1000)
    return Job(
        job_id="j1",
        correlation_id="j1",
        reply_to="stream.q",
        sla_class="interactive",
        model="m",
        body={"model": "m", "messages": [], "stream": True},
        output_cap=None,
        prompt_chars=0,
        published_ms=now_ms,
        deadline_ms=now_ms + 10_000,
        stream=True,
    )


async def test_parts_stay_within_max_bytes_while_the_broker_stalls() -> None:
    """200 chunks arrive while the first confirm is outstanding: they go in
    parts of at most max_bytes, in order, not as one 200 KB part."""
    publisher = StallingPublisher()
    policy = CoalescePolicy(max_delay_s=0.0, max_tokens=1, max_bytes=4 * CHUNK_BYTES)
    relay = StreamRelay(lambda: publisher, policy)
    upstream = Upstream(200, closed=publisher.release)  # read all, then confirms flow
    relayed = await relay.relay(
        job(), Opened([chunk(0)], upstream), run="r1", deadline=time.monotonic() + 10
    )
    assert relayed.failure is None and relayed.gone is None
    sizes = [len(p["chunks"]) for p in publisher.parts]
    assert max(sizes) <= 4, sizes
    assert len(publisher.parts) == relayed.seq >= 200 // 4
    assert [p["seq"] for p in publisher.parts] == list(range(len(publisher.parts)))
    contents = [
        c["choices"][0]["delta"]["content"][:4] for p in publisher.parts for c in p["chunks"]
    ]
    assert contents + [c.body["choices"][0]["delta"]["content"][:4] for c in relayed.tail] == [
        f"{i:04d}" for i in range(200)
    ]


async def test_a_chunk_bigger_than_max_bytes_still_goes_alone() -> None:
    publisher = StallingPublisher()
    publisher.release.set()
    policy = CoalescePolicy(max_delay_s=0.0, max_tokens=1, max_bytes=10)
    relay = StreamRelay(lambda: publisher, policy)
    relayed = await relay.relay(
        job(), Opened([chunk(0)], Upstream(3)), run="r1", deadline=time.monotonic() + 10
    )
    assert relayed.failure is None
    assert [len(p["chunks"]) for p in publisher.parts] == [1, 1, 1]
