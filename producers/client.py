"""``LlmqClient``: submit jobs and wait for their replies.

RPC over one reply queue per client (durable, not exclusive, expiring when
unused, so it outlives a dropped connection; a quorum queue by default, so
it also outlives the loss of the cluster node it lives on): each job's
correlation id maps to a future; unknown, late and duplicate replies are
ignored. Every
publish waits for the broker's confirm: a nack (the work queue is full) is
:class:`Backpressure`, a returned message :class:`Unroutable`; a publish cut
off by a reconnect is sent again with the same job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, DeliveryMode

from producers.errors import (
    Backpressure,
    DeadlineExceeded,
    PublishFailed,
    TooLarge,
    Unroutable,
    error_for,
)
from producers.stream import ChatStream, StreamQueues
from schemas.broker.connection import connect
from schemas.broker.errors import BrokerFailure, Refused, Rejected, Returned
from schemas.broker.errors import TooLarge as BrokerTooLarge
from schemas.broker.publisher import Outgoing, Publisher
from schemas.broker_urls import split_urls
from schemas.codec import decode_reply
from schemas.contract import CONTENT_TYPE, HEADERS, JobKind, SlaClass

__all__ = ["LlmqClient", "broker_user"]

_REPUBLISH_WINDOW_S = 30.0
_REPLY_GRACE_S = 5.0
_REPLY_QUEUE_EXPIRES_MS = 300_000
_CLOSE_STEP_S = 5.0

ReplyQueueType = Literal["quorum", "classic"]


class LlmqClient:
    """Async client for llmq. Use as ``async with LlmqClient(url) as client:``."""

    def __init__(
        self,
        url: str | Sequence[str] = "amqp://guest:guest@127.0.0.1:5672/",
        *,
        exchange: str = "llmq.jobs",
        default_sla_ms: int = 30_000,
        max_unconfirmed: int = 256,
        tenant: str | None = None,
        user_id: str | None = None,
        reply_queue_type: ReplyQueueType = "quorum",
    ) -> None:
        """``url``: one AMQP URL, or the nodes of one cluster (a list, or URLs separated
        by commas): the connection moves to a live node when its own dies.

        ``user_id`` (default: the URL's user) is sent on every job; RabbitMQ checks
        it against the connection's user, so workers can trust it to name the tenant
        (docs/security.md). Pass ``""`` to send none (e.g. with EXTERNAL auth)."""
        self._url = url
        self._exchange_name = exchange
        self._default_sla_ms = default_sla_ms
        self._unconfirmed = asyncio.Semaphore(max_unconfirmed)
        self._tenant = tenant
        first = url if isinstance(url, str) else (url[0] if url else "")
        self._user_id = broker_user(first) if user_id is None else (user_id or None)
        self._connection: AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._publisher: Publisher | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reply: aio_pika.abc.AbstractQueue | None = None
        self._reply_tag: str | None = None
        self._reply_queue_type = reply_queue_type
        self.reply_queue = f"llmq.reply.{uuid.uuid4().hex}"
        self.stream_queues = StreamQueues(self._stream_channel, self.reply_queue)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is open now (false while it reconnects)."""
        c = self._connection
        return c is not None and not c.is_closed and c.connected.is_set()

    async def __aenter__(self) -> LlmqClient:
        # Frames read through the guard: a reply the client library could not
        # decode arrives marked (and unmatched) instead of ending the connection.
        self._connection = await connect(self._url, name="llmq-client")
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._publisher = await Publisher.open(self._connection)
        # A name of our own (not server-named) so a reconnect re-declares the same
        # queue; not exclusive and not auto-delete, so it outlives a dropped
        # connection and keeps the replies published meanwhile. The broker deletes
        # it once it has been unused for _REPLY_QUEUE_EXPIRES_MS. Durable: RabbitMQ
        # 4.3 refuses transient queues that are not exclusive (the deprecated
        # feature transient_nonexcl_queues), and a durable one also outlives a
        # broker restart. Quorum (3.10+ take x-expires on it): a classic queue
        # whose node is down refuses the replies meant for it, and cannot even
        # be re-declared elsewhere until that node is back.
        arguments: dict[str, Any] = {"x-expires": _REPLY_QUEUE_EXPIRES_MS}
        if self._reply_queue_type == "quorum":
            arguments["x-queue-type"] = "quorum"
        self._reply = await self._channel.declare_queue(
            self.reply_queue, durable=True, arguments=arguments
        )
        self._reply_tag = await self._reply.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        await self.stream_queues.close()
        # Each step bounded: while no node is reachable a robust channel's calls
        # wait for a reconnect that may never come, and leaving must not hang.
        # The reply queue left behind expires on its own (x-expires).
        if self._reply is not None and self._reply_tag is not None:
            # Cancel first: deleting a queue under its consumer makes the broker
            # cancel it, which aio-pika logs as a warning.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_STEP_S):
                    await self._reply.cancel(self._reply_tag)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_STEP_S):
                    await self._channel.queue_delete(self.reply_queue)
        if self._connection is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_STEP_S):
                    await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is None or future.done():
            return  # unknown, late or duplicate: at-least-once allows these
        try:
            future.set_result(decode_reply(message.body))
        except (ValueError, orjson.JSONDecodeError) as exc:
            future.set_exception(PublishFailed(f"malformed reply: {exc}"))

    async def submit(
        self,
        job: Mapping[str, Any],
        *,
        reply_to: str | None = None,
        job_id: str | None = None,
        correlation_id: str | None = None,
        sla_class: str = SlaClass.INTERACTIVE.value,
        sla_ms: int | None = None,
        deadline_ms: int | None = None,
        model: str | None = None,
        tenant: str | None = None,
        traceparent: str | None = None,
        headers: Mapping[str, Any] | None = None,
        kind: JobKind | str = JobKind.CHAT,
    ) -> str:
        """Publish one job and return its id once the broker confirmed it.

        ``reply_to`` defaults to this client's reply queue; ``kind`` says what
        the body is (a chat-completions or an embeddings request).
        """
        job_id = job_id or uuid.uuid4().hex
        now_ms = int(time.time() * 1000)
        h: dict[str, Any] = {HEADERS.PUBLISHED_MS: now_ms}
        h[HEADERS.SLA_MS] = sla_ms or self._default_sla_ms
        if deadline_ms is not None:
            h[HEADERS.DEADLINE_MS] = deadline_ms
        if model is not None:
            h[HEADERS.MODEL] = model
        if tenant or self._tenant:
            h[HEADERS.TENANT] = tenant or self._tenant
        if traceparent is not None:
            h[HEADERS.TRACEPARENT] = traceparent
        if kind != JobKind.CHAT:
            h[HEADERS.KIND] = str(kind)
        if headers:
            h.update(headers)
        message = aio_pika.Message(
            orjson.dumps(job),
            message_id=job_id,
            correlation_id=correlation_id or job_id,
            reply_to=reply_to or self.reply_queue,
            user_id=self._user_id,
            content_type=CONTENT_TYPE,
            delivery_mode=DeliveryMode.PERSISTENT,
            headers=h,
        )
        await self._publish(message, sla_class)
        return job_id

    async def _publish(self, message: aio_pika.Message, routing_key: str) -> None:
        publisher = self._publisher
        assert publisher is not None, "use LlmqClient as an async context manager"
        async with self._unconfirmed:
            try:
                # Cut off by a reconnect, it is sent again with the same id
                # (the broker may or may not have it; workers answer duplicates).
                await publisher.publish(
                    Outgoing.of(message),
                    exchange=self._exchange_name,
                    routing_key=routing_key,
                    timeout_s=_REPUBLISH_WINDOW_S,
                    bound_confirm=False,
                )
            except Returned as exc:
                why = f"nothing is bound for routing key {routing_key!r} ({exc})"
                raise Unroutable(why) from None
            except Refused:
                raise Backpressure(f"the {routing_key} queue is full; retry later") from None
            except BrokerTooLarge as exc:
                raise TooLarge(str(exc)) from None
            except Rejected as exc:
                raise PublishFailed(str(exc)) from None
            except BrokerFailure as exc:
                raise PublishFailed(f"broker unreachable: {exc}") from None

    async def submit_many(self, jobs: Iterable[Mapping[str, Any]], **options: Any) -> list[str]:
        """Publish many jobs concurrently (at most ``max_unconfirmed`` unconfirmed)."""
        return list(await asyncio.gather(*(self.submit(job, **options) for job in jobs)))

    async def call(
        self, job: Mapping[str, Any], *, timeout_s: float | None = None, **options: Any
    ) -> dict[str, Any]:
        """Submit a job to this client's reply queue and return the whole reply envelope."""
        job_id = options.pop("job_id", None) or uuid.uuid4().hex
        correlation_id = options.pop("correlation_id", None) or job_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        sla_ms = options.get("sla_ms") or self._default_sla_ms
        wait = timeout_s if timeout_s is not None else sla_ms / 1000 + _REPLY_GRACE_S
        try:
            await self.submit(job, job_id=job_id, correlation_id=correlation_id, **options)
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no reply within {wait:.1f} s", job_id=job_id, reply={}
            ) from None
        finally:
            self._waiting.pop(correlation_id, None)
            with contextlib.suppress(Exception):
                future.cancel()

    async def complete(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        sla_ms: int | None = None,
        sla_class: str = SlaClass.INTERACTIVE.value,
        tenant: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Run a chat completion through llmq; return the OpenAI response or raise.

        Raises the :mod:`producers.errors` class of the reply's error code.
        """
        reply = await self.call(
            {"model": model, "messages": messages, **params},
            sla_ms=sla_ms,
            sla_class=sla_class,
            tenant=tenant,
        )
        if reply["status"] != "ok":
            raise error_for(reply)
        response: dict[str, Any] = reply["response"]
        return response

    def stream(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        sla_ms: int | None = None,
        sla_class: str = SlaClass.INTERACTIVE.value,
        tenant: str | None = None,
        job_id: str | None = None,
        traceparent: str | None = None,
        **params: Any,
    ) -> ChatStream:
        """A streamed chat completion: ``async with client.stream(...) as s: async for
        chunk in s``. Chunks are OpenAI ``chat.completion.chunk`` objects; after the
        last, ``s.finish_reason``, ``s.usage`` and ``s.routing`` are set.

        Errors before the first chunk raise as :meth:`complete` does; a stream that
        breaks off after it raises :class:`~producers.errors.StreamInterrupted`.
        Leaving the ``async with`` early cancels the upstream call."""
        job_id = job_id or uuid.uuid4().hex
        body = {"model": model, "messages": messages, **params, "stream": True}
        wait_s = (sla_ms or self._default_sla_ms) / 1000 + _REPLY_GRACE_S

        async def submit(queue: str) -> str:
            return await self.submit(
                body,
                reply_to=queue,
                job_id=job_id,
                sla_ms=sla_ms,
                sla_class=sla_class,
                tenant=tenant,
                traceparent=traceparent,
            )

        # A queue per stream, never per job id: two streams may carry one id (a
        # caller's retry), and each deletes its own queue when it ends.
        return ChatStream(self.stream_queues, submit, wait_s=wait_s)

    def _stream_channel(self) -> aio_pika.abc.AbstractChannel:
        assert self._channel is not None, "use LlmqClient as an async context manager"
        return self._channel

    async def embed(
        self,
        model: str,
        input: str | list[str] | list[int] | list[list[int]],
        *,
        sla_ms: int | None = None,
        sla_class: str = SlaClass.INTERACTIVE.value,
        tenant: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Embed ``input`` through llmq; return the OpenAI embeddings response or raise.

        ``params`` are further fields of the request (``dimensions``,
        ``encoding_format``...). Raises as :meth:`complete` does.
        """
        reply = await self.call(
            {"model": model, "input": input, **params},
            sla_ms=sla_ms,
            sla_class=sla_class,
            tenant=tenant,
            kind=JobKind.EMBEDDING,
        )
        if reply["status"] != "ok":
            raise error_for(reply)
        response: dict[str, Any] = reply["response"]
        return response


def broker_user(url: str) -> str | None:
    """The user a URL (or a comma-separated list of one cluster's) authenticates as
    with PLAIN auth, else None."""
    parts = urlsplit((split_urls(url) or ("",))[0])
    if "external" in parse_qs(parts.query).get("auth", [""])[0].lower():
        return None
    return unquote(parts.username) if parts.username else None
