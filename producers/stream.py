"""``ChatStream``: one streamed chat completion, read part by part.

Made by :meth:`LlmqClient.stream`. Each stream has a reply queue of its own,
exclusive to the client's connection: closing the stream deletes it, and the
worker's next publish to it comes back unroutable, which is how a caller who
stops listening cancels the upstream call (within one coalescing interval).
The queue dies with the connection too; the worker then ends the job as
``stream_interrupted`` and dead-letters it.

The parts' rules (:mod:`schemas.stream`) are checked here: parts of one run
come in order; a part out of order means one was lost; a new run after chunks
were yielded means the job was served again from the start (a worker died),
and the two answers cannot be spliced. Both end the stream with
:class:`~producers.errors.StreamInterrupted`. Errors before the first chunk
raise as :meth:`LlmqClient.complete` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from producers.errors import DeadlineExceeded, PublishFailed, StreamInterrupted, error_for
from schemas.codec import error_body
from schemas.errors import ErrorCode
from schemas.stream import Part, chunks_of_completion, decode_part, is_part

__all__ = ["ChatStream"]

_CLOSE_S = 5.0


class StreamQueue:
    """One stream's exclusive queue with its consumer and inbox."""

    def __init__(self, name: str, queue: AbstractQueue) -> None:
        self.name = name
        self.queue = queue
        self.tag: str | None = None
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.messages = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages += 1
        self.inbox.put_nowait(message.body)

    async def delete(self) -> None:
        """Cancel the consumer and delete the queue, bounded: a node that stopped
        answering must not hold the caller (an exclusive queue goes with its
        connection anyway)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_S):
                if self.tag is not None:
                    await self.queue.cancel(self.tag)
                await self.queue.delete(if_unused=False, if_empty=False)


class StreamQueues:
    """Stream queues made ready before the streams that take them.

    Declaring a queue and consuming from it are two round trips to the broker
    (1–6 ms here, more on a loaded node): done ahead, they stay off the time to
    first token. Each queue serves one stream and is deleted after it, since
    deleting it is how a stream is cancelled. The pool fills once the first
    stream is asked for, so a client that never streams declares nothing.
    """

    def __init__(
        self, channel: Callable[[], AbstractChannel], prefix: str, *, spare: int = 4
    ) -> None:
        self._channel = channel
        self._prefix = prefix
        self._spare = spare
        self._ready: list[StreamQueue] = []
        self._filling: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def ready(self) -> list[str]:
        """Names of the queues ready for the next streams."""
        return [q.name for q in self._ready]

    async def take(self) -> StreamQueue:
        ready = self._ready.pop() if self._ready else await self._open()
        self._refill()
        return ready

    def _refill(self) -> None:
        while not self._closed and len(self._ready) + len(self._filling) < self._spare:
            task = asyncio.create_task(self._fill())
            self._filling.add(task)
            task.add_done_callback(self._filling.discard)

    async def _fill(self) -> None:
        with contextlib.suppress(Exception):  # the next take declares its own
            queue = await self._open()
            if self._closed:
                await queue.delete()
            else:
                self._ready.append(queue)

    async def _open(self) -> StreamQueue:
        name = f"{self._prefix}.{uuid.uuid4().hex}"
        # Exclusive: legal on RabbitMQ 4.3 (unlike a transient shared queue),
        # and no one else's to read or delete.
        queue = StreamQueue(name, await self._channel().declare_queue(name, exclusive=True))
        queue.tag = await queue.queue.consume(queue.on_message, no_ack=True)
        return queue

    async def close(self) -> None:
        self._closed = True
        for task in list(self._filling):
            task.cancel()
        await asyncio.gather(*self._filling, return_exceptions=True)
        ready, self._ready = self._ready, []
        await asyncio.gather(*(q.delete() for q in ready))


class ChatStream:
    """An async iterator of ``chat.completion.chunk`` objects; use with ``async with``.

    After the last chunk: :attr:`finish_reason`, :attr:`usage` and
    :attr:`routing` (as in a reply) are set.
    """

    def __init__(
        self,
        queues: StreamQueues,
        submit: Callable[[str], Awaitable[str]],
        *,
        wait_s: float,
    ) -> None:
        self._queues = queues
        self._submit = submit
        self._wait_s = wait_s
        self._queue: StreamQueue | None = None
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self._started = False
        self._closed = False
        self.job_id: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.routing: dict[str, Any] = {}

    @property
    def queue_name(self) -> str | None:
        return None if self._queue is None else self._queue.name

    @property
    def messages(self) -> int:
        """Broker messages received (parts, or a reply): chunks per message is the coalescing."""
        return 0 if self._queue is None else self._queue.messages

    async def __aenter__(self) -> ChatStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Take a stream queue and publish the job (once the broker confirmed it)."""
        if self._started:
            return
        self._started = True
        self._queue = await self._queues.take()
        self._inbox = self._queue.inbox
        try:
            self.job_id = await self._submit(self._queue.name)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop the stream: the queue goes, and with it the worker's upstream call."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None:
            await self._queue.delete()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[dict[str, Any]]:
        await self.start()
        try:
            async for chunk in self._read():
                yield chunk
        finally:
            await self.aclose()

    async def _read_parts(self) -> AsyncIterator[list[dict[str, Any]]]:
        """The chunks of each message as they come (the rules of the module docstring)."""
        deadline = time.monotonic() + self._wait_s
        run: str | None = None
        expected = 0
        yielded = False
        while True:
            left = deadline - time.monotonic()
            try:
                body = await asyncio.wait_for(self._inbox.get(), max(left, 0.0))
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the stream stalled: nothing within {self._wait_s:.1f} s",
                    job_id=self.job_id,
                    reply={},
                ) from None
            data = _decode(body)
            if not is_part(data):
                # An ordinary reply: a failure before the first chunk, or an
                # answer from a worker that does not stream.
                if data.get("status") != "ok":
                    if yielded:
                        raise self._interrupted("the job failed after it began", data)
                    raise error_for(data)
                if yielded:
                    continue  # an old whole answer after a new stream began: ignore it
                self.routing = data.get("routing") or {}
                yield chunks_of_completion(data.get("response") or {})
                return
            try:
                part = decode_part(data)
            except ValueError as exc:
                raise PublishFailed(f"malformed stream part: {exc}") from None
            if part.run != run:
                if yielded:
                    raise self._interrupted("the job was served again from the start", data)
                run, expected = part.run, 0
            if part.seq < expected:
                continue  # a duplicate
            if part.seq > expected:
                raise self._interrupted(f"part {expected} of the stream was lost", data)
            expected += 1
            if part.chunks:
                yielded = True
                yield part.chunks
            if part.last:
                self._finish(part, data)
                return

    async def _read(self) -> AsyncIterator[dict[str, Any]]:
        async for chunks in self._read_parts():
            for chunk in chunks:
                yield chunk

    async def parts(self) -> AsyncIterator[list[dict[str, Any]]]:
        """The chunks one broker message at a time (a relay writes each batch at once)."""
        await self.start()
        try:
            async for chunks in self._read_parts():
                yield chunks
        finally:
            await self.aclose()

    def _finish(self, part: Part, data: dict[str, Any]) -> None:
        self.finish_reason = part.finish_reason
        self.usage = part.usage
        self.routing = part.routing or {}
        if part.status != "ok":
            raise error_for({**data, "status": "error"})

    def _interrupted(self, why: str, data: dict[str, Any]) -> StreamInterrupted:
        reply = {"job_id": self.job_id, "status": "error", "routing": data.get("routing") or {}}
        reply["error"] = error_body(ErrorCode.STREAM_INTERRUPTED, why)
        return StreamInterrupted(why, job_id=self.job_id, reply=reply)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PublishFailed(f"malformed stream message: {exc}") from None
    if not isinstance(data, dict):
        raise PublishFailed("malformed stream message: not an object")
    return data
