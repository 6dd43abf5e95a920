"""One fake upstream on its own port: the HTTP side of an :class:`Endpoint`.

Uses aiohttp's low-level ``web.Server`` (no router, no middlewares): measured
faster than ``web.Application`` for this handful of fixed paths (docs/fleet.md).
The listening socket is our own ``asyncio.Server`` so a ``down`` window can
really close it (connection refused) and reopen it on the same port later.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from workers.fleet import anthropic_wire as anthropic
from workers.fleet import azure_wire as azure
from workers.fleet import stream
from workers.fleet.anthropic_wire import MessagesCall
from workers.fleet.plan import Outcome, Plan, plan_request
from workers.fleet.scenario import Endpoint
from workers.fleet.stats import EndpointStats
from workers.fleet.wire import (
    MALFORMED_BODY,
    OPENAI,
    ChatCall,
    Dialect,
    EmbeddingCall,
    Refusal,
    completion_dict,
    embeddings_body,
    error_body,
    models_body,
    parse_chat,
    parse_embeddings,
    prompt_tokens,
)

__all__ = ["Admin", "EndpointServer", "Seen"]

_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_REBIND_TRIES = 50
"""Reopening right after a close can meet EADDRINUSE while the old socket closes."""


class Admin:
    """The fleet-wide ``/fleet/*`` calls every endpoint serves: stats and reset."""

    def __init__(self, stats: Callable[[], dict[str, Any]], reset: Callable[[], None]) -> None:
        self.stats = stats
        self.reset = reset


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it arrived (kept when the endpoint's ``record`` > 0)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


_OPENAI_POSTS: dict[str, Callable[[bytes, tuple[str, ...]], ChatCall | EmbeddingCall | Refusal]]
_OPENAI_POSTS = {"/v1/chat/completions": parse_chat, "/v1/embeddings": parse_embeddings}
_BASE_PATH = {"openai": "/v1"}
"""What a client's base URL adds to ``http://host:port``, per kind (azure and
anthropic: nothing; Anthropic's base URL is the API root)."""


class EndpointServer:
    """Serves one endpoint; the fleet opens, closes and reads it.

    Each provider kind has one method, ``serve_<kind>``, that answers its
    provider's paths (None for a path that is not one of them); ``_route``
    calls the endpoint's, then the fleet-wide ``/fleet/*`` paths.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        key: str | None,
        rng: random.Random,
        clock: Callable[[], float],
        host: str,
        admin: Admin,
    ) -> None:
        self.endpoint = endpoint
        self.host = host
        self.port = endpoint.port
        self.stats = EndpointStats()
        self._key = key
        self._auth = f"Bearer {key}" if key else None
        self._rng = rng
        self._clock = clock
        self._admin = admin
        self._seq = 0
        self._slots = asyncio.Semaphore(endpoint.capacity) if endpoint.capacity else None
        self._headers = {"Content-Type": _JSON, "x-fleet-endpoint": endpoint.name}
        self._http = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._listener: asyncio.Server | None = None
        self._opened = False
        self._running: set[asyncio.Task[Any]] = set()
        self._cached: set[str] = set()  # anthropic prompt-cache prefixes written so far
        self.seen: deque[Seen] | None = deque(maxlen=endpoint.record) if endpoint.record else None
        kinds: dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse | None]]] = {
            "openai": self.serve_openai,
            "azure": self.serve_azure,
            "anthropic": self.serve_anthropic,
        }
        self._serve_kind = kinds[endpoint.kind]

    @property
    def listening(self) -> bool:
        """Whether the port accepts connections now."""
        return self._listener is not None

    @property
    def connections(self) -> int:
        """Open client connections (idle keep-alive ones included)."""
        return len(self._http.connections)

    @property
    def url(self) -> str:
        """The base URL clients configure: ``http://host:port/v1`` for openai,
        the root ``http://host:port`` for azure and anthropic."""
        return f"http://{self.host}:{self.port}{_BASE_PATH.get(self.endpoint.kind, '')}"

    async def open(self) -> None:
        """Listen on the endpoint's port (the same one again after a close)."""
        if self._listener is not None:
            return
        loop = asyncio.get_running_loop()
        for attempt in range(_REBIND_TRIES):
            try:
                self._listener = await loop.create_server(
                    self._http, self.host, self.port, reuse_address=True, backlog=1024
                )
                break
            except OSError as exc:
                reopening = self._opened
                if not reopening or exc.errno != errno.EADDRINUSE or attempt == _REBIND_TRIES - 1:
                    raise
                await asyncio.sleep(0.02)
        assert self._listener is not None
        self.port = self._listener.sockets[0].getsockname()[1]
        self._opened = True

    async def close(self) -> None:
        """Refuse new connections and cut the open ones, as a crashed upstream would."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        for connection in self._http.connections:
            connection.force_close()
        running = [t for t in self._running if t is not asyncio.current_task()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.wait_closed(), 1.0)
        await asyncio.sleep(0)  # let the loop release the socket before a rebind

    def _answer(
        self, status: int, body: bytes, extra: dict[str, str] | None = None
    ) -> web.Response:
        self.stats.status(status)
        headers = self._headers if extra is None else {**self._headers, **extra}
        return web.Response(status=status, body=body, headers=headers)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # asyncio holds tasks weakly: a handler whose client vanished mid-request
        # can wait on a future only its dead connection references, and would be
        # garbage-collected while pending. Held here until it ends or close() ends it.
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return await self._route(request)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.seen is not None:
            await self._record(request)
        served = await self._serve_kind(request)
        if served is not None:
            return served
        path, method = request.path, request.method
        if path == "/fleet/stats" and method == "GET":
            return web.Response(body=orjson.dumps(self._admin.stats()), headers=self._headers)
        if path == "/fleet/reset" and method == "POST":
            self._admin.reset()
            return web.Response(body=b'{"reset": true}', headers=self._headers)
        message = f"Unknown request URL: {method} {path}."
        return web.Response(
            status=404,
            body=error_body(message, "invalid_request_error", "unknown_url"),
            headers=self._headers,
        )

    async def _record(self, request: web.BaseRequest) -> None:
        assert self.seen is not None
        body = await request.read()  # aiohttp keeps it: the handler reads it again
        query = dict(request.query)
        self.seen.append(Seen(request.method, request.path, query, dict(request.headers), body))

    async def serve_openai(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """OpenAI's paths: chat completions, embeddings, the model list."""
        path, method = request.path, request.method
        if method == "POST":
            parse = _OPENAI_POSTS.get(path)
            if parse is None:
                return None
            self.stats.arrive(time.monotonic())
            if self._auth is not None and request.headers.get("Authorization") != self._auth:
                return self._answer(401, self._bad_key(request))
            call = parse(await request.read(), self.endpoint.models)
            return await self._call(request, call, OPENAI)
        if path == "/v1/models" and method == "GET":
            self.stats.arrive(time.monotonic())
            if self._auth is not None and request.headers.get("Authorization") != self._auth:
                return self._answer(401, self._bad_key(request))
            return self._answer(200, models_body(self.endpoint.models, 0, "fleet"))
        return None

    async def serve_azure(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """Azure OpenAI's deployment paths: the api-version, the key, the deployment."""
        target = azure.deployment_call(request.path)
        if target is None or request.method != "POST":
            return None
        self.stats.arrive(time.monotonic())
        deployment, operation = target
        version = request.query.get("api-version")
        refused = None if self._azure_key_ok(request) else self._azure_bad_key(request)
        if refused is None:
            refused = azure.version_refusal(version)
        if refused is None and deployment not in self.endpoint.models:
            refused = azure.UNKNOWN_DEPLOYMENT
        if refused is not None:
            return self._answer(refused.status, refused.body)
        raw = await request.read()
        if operation == "embeddings":
            call: ChatCall | EmbeddingCall | Refusal = parse_embeddings(
                raw, self.endpoint.models, deployment
            )
        else:
            call = parse_chat(raw, self.endpoint.models, deployment, streams=False)
            if isinstance(call, ChatCall) and azure.filtered(call.messages):
                call = azure.content_filter_refusal()
        dialect = azure.dialect(operation, str(version), self.endpoint.retry_after_s)
        return await self._call(request, call, dialect)

    async def serve_anthropic(self, request: web.BaseRequest) -> web.StreamResponse | None:
        """Anthropic's Messages API: the headers, then the request as strictly as Anthropic."""
        if request.path != "/v1/messages" or request.method != "POST":
            return None
        self.stats.arrive(time.monotonic())
        refused = anthropic.check_headers(request.headers, self._key, self.endpoint.echo_key)
        call = refused or anthropic.parse_messages(await request.read(), self.endpoint.models)
        return await self._call(request, call, anthropic.DIALECT)

    def _message(self, call: MessagesCall, plan: Plan, seq: int) -> bytes:
        """A Messages answer; a cache prefix is written the first time, read after."""
        read = write = 0
        if call.cache_prefix in self._cached:
            read = call.cache_tokens
        elif call.cache_prefix is not None:
            write = call.cache_tokens
            self._cached.add(call.cache_prefix)
        return anthropic.message_body(
            call,
            endpoint=self.endpoint.name,
            seq=seq,
            output_tokens=plan.completion_tokens,
            truncated=plan.finish_reason == "length",
            usage=plan.usage,
            cache_read=read,
            cache_write=write,
        )

    def _azure_key_ok(self, request: web.BaseRequest) -> bool:
        """An ``api-key`` header, or the same secret as an Entra ID bearer token."""
        if self._key is None:
            return True
        headers = request.headers
        return headers.get("api-key") == self._key or headers.get("Authorization") == self._auth

    def _azure_bad_key(self, request: web.BaseRequest) -> Refusal:
        echo = self.endpoint.echo_key
        if echo == "none":
            return azure.BAD_KEY
        given = request.headers.get("api-key", "")
        shown = given if echo == "full" else f"{given[:3]}{'*' * 20}{given[-4:]}"
        return azure.error(401, "401", f"Access denied: key {shown} is invalid. (fleet: api_key)")

    def _bad_key(self, request: web.BaseRequest) -> bytes:
        echo = self.endpoint.echo_key
        if echo == "none":
            return _BAD_KEY
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        shown = given if echo == "full" else f"{given[:3]}{'*' * 20}{given[-4:]}"
        return error_body(
            f"Incorrect API key provided: {shown}. (fleet: api_key)",
            "invalid_request_error",
            "invalid_api_key",
        )

    async def _call(
        self,
        request: web.BaseRequest,
        call: ChatCall | EmbeddingCall | MessagesCall | Refusal,
        dialect: Dialect,
    ) -> web.StreamResponse:
        """A checked request through the endpoint's faults, capacity and latency."""
        if isinstance(call, Refusal):
            return self._answer(call.status, call.body)
        stats = self.stats
        if isinstance(call, ChatCall):
            plan = plan_request(
                self.endpoint, self._rng, self._clock(), call.max_tokens, stream=call.stream
            )
        elif isinstance(call, MessagesCall):
            plan = plan_request(self.endpoint, self._rng, self._clock(), call.max_tokens)
        else:
            plan = plan_request(self.endpoint, self._rng, self._clock(), input_tokens=call.tokens)
        seq = self._seq = self._seq + 1
        if plan.outcome is Outcome.RATE_LIMITED:
            stats.outcome(plan.outcome.value)
            return self._too_many(dialect.too_many("rate_limit_rate"))
        slots = self._slots
        try:
            if slots is not None:
                if slots.locked() and self.endpoint.over_capacity == "429":
                    stats.outcome("over_capacity")
                    return self._too_many(dialect.too_many("capacity"))
                if slots.locked():
                    stats.queued += 1
                    try:
                        await slots.acquire()
                    finally:
                        stats.queued -= 1
                else:
                    await slots.acquire()  # a free slot: returns without waiting
            stats.outcome(plan.outcome.value)
            stats.enter()
            try:
                return await self._serve(request, call, plan, seq, dialect)
            finally:
                stats.in_flight -= 1
                if slots is not None:
                    slots.release()
        except asyncio.CancelledError:
            if plan.outcome is not Outcome.HANG:  # a hang always ends in a disconnect
                stats.dropped += 1
            raise

    def _too_many(self, body: bytes) -> web.Response:
        after = self.endpoint.retry_after_s
        extra = {
            "Retry-After": str(math.ceil(after)),
            "retry-after-ms": str(round(after * 1000)),
        }
        return self._answer(429, body, extra)

    async def _serve(
        self,
        request: web.BaseRequest,
        call: ChatCall | EmbeddingCall | MessagesCall,
        plan: Plan,
        seq: int,
        dialect: Dialect,
    ) -> web.StreamResponse:
        if plan.outcome is Outcome.HANG:
            self.stats.hangs += 1
            await asyncio.sleep(self.endpoint.hang_max_s)
            # The cap is reached: drop the connection without a word, as a
            # load balancer's idle timeout would.
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError
        streamed = isinstance(call, ChatCall) and call.stream
        delay = plan.latency_s if streamed else plan.delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if plan.outcome is Outcome.ERROR:
            message = "The server had an error while processing your request. (fleet: error_rate)"
            status = self.endpoint.error_status
            return self._answer(status, dialect.error(status, message))
        if streamed:
            assert isinstance(call, ChatCall)
            return await self._stream(request, call, plan, seq)
        if plan.outcome is Outcome.MALFORMED:
            return self._answer(200, MALFORMED_BODY)
        if isinstance(call, EmbeddingCall):
            body = embeddings_body(call, usage=plan.usage)
        elif isinstance(call, MessagesCall):
            body = self._message(call, plan, seq)
        else:
            body = dialect.completion(
                completion_dict(
                    endpoint=self.endpoint.name,
                    seq=seq,
                    model=call.model,
                    created=int(time.time()),
                    completion_tokens=plan.completion_tokens,
                    finish_reason=plan.finish_reason,
                    prompt=prompt_tokens(call.messages),
                    usage=plan.usage,
                )
            )
        if self.endpoint.drip_s <= 0:
            return self._answer(200, body)
        return await self._drip(request, body)

    async def _stream(
        self, request: web.BaseRequest, call: ChatCall, plan: Plan, seq: int
    ) -> web.StreamResponse:
        """A 200 event stream: the first token now, the others paced by the plan.

        Tokens due at once are written together; gaps count from the first
        token, so sleeps do not add up their overshoot. A client gone
        mid-stream ends it here (or cancels the task, counted by ``_call``).
        """
        stats = self.stats
        stats.status(200)
        stats.streams += 1
        response = web.StreamResponse(
            status=200, headers={**self._headers, "Content-Type": _SSE, "Cache-Control": "no-cache"}
        )
        events = stream.stream_events(
            endpoint=self.endpoint.name,
            seq=seq,
            model=call.model,
            created=int(time.time()),
            completion_tokens=plan.completion_tokens,
            finish_reason=plan.finish_reason,
            prompt=prompt_tokens(call.messages),
            usage=plan.usage,
            include_usage=call.include_usage,
        )
        pacing = stream.pace(plan, self.endpoint.token_jitter)
        loop = asyncio.get_running_loop()
        try:
            await response.prepare(request)
            if plan.outcome is Outcome.MALFORMED:
                await response.write(events.first + stream.MALFORMED_EVENT)
                self._cut(request)
                return response
            tokens = events.tokens
            if pacing.cut_after is not None:
                tokens = tokens[: pacing.cut_after]
            pending, start, due = events.first, loop.time(), 0.0
            for i, token in enumerate(tokens):
                if i:
                    due += pacing.gaps_s[i - 1]
                    wait = start + due - loop.time()
                    if wait > 0 and pending:
                        await response.write(pending)
                        pending = b""
                    if wait > 0:
                        await asyncio.sleep(wait)
                pending += token
            if pacing.cut_after is not None:
                await response.write(pending)
                stats.cut += 1
                self._cut(request)
                return response
            await response.write(pending + events.last)
        except ConnectionError:  # the client went away between two writes
            stats.dropped += 1
            return response
        await response.write_eof()
        return response

    @staticmethod
    def _cut(request: web.BaseRequest) -> None:
        """Close the connection mid-body: what was written arrives, then the end
        of the chunked body never does (aiohttp's ``write_eof`` finds it closing)."""
        if request.transport is not None:
            request.transport.close()

    async def _drip(self, request: web.BaseRequest, body: bytes) -> web.StreamResponse:
        """Send the headers, then the body in equal chunks spread over ``drip_s``."""
        self.stats.status(200)
        response = web.StreamResponse(status=200, headers=self._headers)
        response.content_length = len(body)
        await response.prepare(request)
        chunks = self.endpoint.drip_chunks
        size = max(1, math.ceil(len(body) / chunks))
        for start in range(0, len(body), size):
            await asyncio.sleep(self.endpoint.drip_s / chunks)
            await response.write(body[start : start + size])
        await response.write_eof()
        return response


_BAD_KEY = error_body(
    "Incorrect API key provided. (fleet: api_key)", "invalid_request_error", "invalid_api_key"
)
