"""``llmq gateway``: an OpenAI-compatible HTTP front door to llmq.

``POST /v1/chat/completions`` and ``POST /v1/embeddings`` publish the request
body as a job (of kind ``chat`` or ``embedding``) with one shared
:class:`~producers.client.LlmqClient` and wait for its reply within the SLA;
``GET /v1/models`` lists the routable models; ``/healthz`` and ``/readyz`` are
probes; ``/metrics`` is served on its own port
(``gateway.metrics_port``), never to the callers. What each request means —
keys, headers, statuses, error bodies — is decided in
:mod:`producers.gateway_core` and :mod:`producers.gateway_keys`; how long a
connection may take, in :mod:`producers.gateway_server`; this module does the
aiohttp and AMQP work. docs/gateway.md is the user's guide.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import click
import orjson
from aiohttp import web

from producers.client import LlmqClient
from producers.errors import LlmqError, PublishFailed
from producers.gateway_core import (
    INVALID_API_KEY,
    NOT_FOUND,
    REQUEST_TIMEOUT,
    Answer,
    BadRequest,
    Caller,
    answer_for_error,
    answer_for_reply,
    check_body,
    error_answer,
    job_options,
    model_list,
    startup_problem,
)
from producers.gateway_events import StreamCall, stream_call
from producers.gateway_keys import KeyRing, scoped_job_id
from producers.gateway_metrics import GatewayMetrics
from producers.gateway_server import ConnectionLimits, GatewaySite, raise_fd_limit
from producers.gateway_stream import stream_completion
from schemas import event_loop
from schemas.broker_urls import node_of
from schemas.contract import JobKind
from schemas.errors import ErrorCode
from schemas.exposition import MetricsServer, new_registry
from schemas.secrets import redact, url_secrets
from schemas.settings import ConfigError, Settings, load_settings

__all__ = [
    "StartupError",
    "gateway_command",
    "make_app",
    "metrics_port",
    "serve",
    "start_gateway",
]

log = logging.getLogger("llmq.gateway")

_SHUTDOWN_S = 30.0  # in-flight requests may finish this long after SIGTERM
_CODE_BY_STATUS = {
    404: NOT_FOUND,
    405: "method_not_allowed",
    413: ErrorCode.PAYLOAD_TOO_LARGE.value,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _State:
    """What the handlers share; ``client`` is set while the app runs."""

    settings: Settings
    keys: KeyRing
    models: bytes
    metrics: GatewayMetrics
    client: LlmqClient | None = None
    metrics_port: int | None = None
    """The bound ``/metrics`` port, when ``gateway.metrics_port`` is set."""


_STATE = web.AppKey("llmq_gateway", _State)
_CALLER = web.RequestKey("llmq_caller", Caller)


def make_app(settings: Settings) -> web.Application:
    """The gateway's aiohttp application; it connects to the broker on startup.

    Raises :class:`ConfigError` when the settings forbid starting (no keys
    while ``require_auth``, an unknown SLA class).
    """
    problem = startup_problem(settings)
    if problem is not None:
        raise ConfigError(problem)
    gw = settings.gateway
    state = _State(
        settings=settings,
        keys=KeyRing.from_settings(gw),
        models=orjson.dumps(model_list(settings)),
        metrics=GatewayMetrics(new_registry()),
    )
    # client_max_size: aiohttp stops reading a body past the limit (413).
    app = web.Application(client_max_size=gw.max_body_bytes, middlewares=[_measure, _errors, _auth])
    app[_STATE] = state
    app.cleanup_ctx.append(_broker)
    app.cleanup_ctx.append(_metrics)  # after the broker: nothing to undo when it fails
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


async def _broker(app: web.Application) -> AsyncIterator[None]:
    state = app[_STATE]
    settings = state.settings
    async with LlmqClient(
        settings.broker.addresses,
        exchange=settings.topology.jobs_exchange,
        default_sla_ms=settings.gateway.default_sla_ms,
    ) as client:
        state.client = client
        try:
            yield
        finally:
            state.client = None


async def _metrics(app: web.Application) -> AsyncIterator[None]:
    """``/metrics`` (and the probes) on ``gateway.metrics_port``, away from the callers."""
    state = app[_STATE]
    gw = state.settings.gateway
    if gw.metrics_port is None:
        yield
        return
    server = MetricsServer(
        state.metrics.registry,
        health=lambda: (True, {"status": "ok"}),
        ready=lambda: (_broker_open(state.client), {"broker": _broker_open(state.client)}),
    )
    try:
        state.metrics_port = await server.start(gw.metrics_host, gw.metrics_port)
        log.info("gateway metrics on http://%s:%d/metrics", gw.metrics_host, state.metrics_port)
    except OSError as exc:
        log.error(
            "gateway: cannot serve metrics on %s:%d (%s); serving requests without /metrics",
            gw.metrics_host,
            gw.metrics_port,
            exc.strerror or exc,
        )
        yield
        return
    try:
        yield
    finally:
        state.metrics_port = None
        await server.stop()


def metrics_port(runner: web.AppRunner) -> int | None:
    """The port a running gateway serves ``/metrics`` on (None: not served)."""
    return runner.app[_STATE].metrics_port


def _respond(answer: Answer) -> web.Response:
    return web.Response(
        body=orjson.dumps(answer.body),
        status=answer.status,
        headers=answer.headers,
        content_type="application/json",
    )


@web.middleware
async def _measure(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by route and status, and time it (``/metrics``)."""
    metrics = request.app[_STATE].metrics
    start = time.perf_counter()
    status = 500
    metrics.in_flight.inc()
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except ConnectionError:
        status = 499  # the caller went away (nginx's code for it)
        raise
    finally:
        metrics.in_flight.dec()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.observe(route, status, time.perf_counter() - start)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as OpenAI-style JSON, aiohttp's own (404, 405, 413) included."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _CODE_BY_STATUS.get(exc.status, ErrorCode.INVALID_REQUEST.value)
        message = exc.reason
        if exc.status == 413:
            limit = request.app[_STATE].settings.gateway.max_body_bytes
            message = f"the request body is larger than {limit} bytes"
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _respond(error_answer(exc.status, code, message, headers=allow))
    except ConnectionError:
        raise  # the caller went away: nobody to answer
    except Exception:
        log.exception("gateway: unexpected error on %s %s", request.method, request.path)
        return _respond(
            error_answer(500, ErrorCode.INTERNAL_ERROR.value, "internal error", retriable=False)
        )


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/v1/*`` needs ``Authorization: Bearer <key>``; the probes do not.

    The key names the caller (``request[_CALLER]``): its tenant and the scope
    of its request ids.
    """
    if not request.path.startswith("/v1/"):
        return await handler(request)
    caller = request.app[_STATE].keys.identify(request.headers.get("Authorization"))
    if caller is None:
        return _respond(
            error_answer(
                401,
                INVALID_API_KEY,
                "missing or invalid API key: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        )
    request[_CALLER] = caller
    return await handler(request)


def _broker_open(client: LlmqClient | None) -> bool:
    return client is not None and client.connected


def _bad_request(message: str) -> web.Response:
    return _respond(error_answer(400, ErrorCode.INVALID_REQUEST.value, message, retriable=False))


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _job(request, JobKind.CHAT)


async def _embeddings(request: web.Request) -> web.StreamResponse:
    return await _job(request, JobKind.EMBEDDING)


async def _job(request: web.Request, kind: JobKind) -> web.StreamResponse:
    """One request, one job of ``kind``: the worker validates its body.

    ``stream: true`` (chat only) is answered as server-sent events
    (:mod:`producers.gateway_stream`); everything up to the publish is shared.
    """
    state = request.app[_STATE]
    gw = state.settings.gateway
    if request.content_length is not None and request.content_length > gw.max_body_bytes:
        # Refused from the header alone: not one byte of the body is read.
        raise web.HTTPRequestEntityTooLarge(
            max_size=gw.max_body_bytes, actual_size=request.content_length
        )
    try:
        async with asyncio.timeout(gw.body_timeout_s):
            raw = await request.read()  # raises 413 as soon as more than the limit arrived
    except TimeoutError:
        return await _body_too_slow(request, gw.body_timeout_s)
    caller = request[_CALLER]
    try:
        body = check_body(orjson.loads(raw), may_stream=kind is JobKind.CHAT)
        streamed: StreamCall | None = stream_call(body) if body.get("stream") is True else None
        options = job_options(
            request.headers,
            default_sla_ms=gw.default_sla_ms,
            max_sla_ms=gw.max_sla_ms,
            caller=caller,
            trust_tenant_header=gw.trust_tenant_header,
        )
    except orjson.JSONDecodeError:
        return _bad_request("the request body is not valid JSON")
    except BadRequest as exc:
        return _bad_request(str(exc))
    request_id = options.request_id or uuid.uuid4().hex
    # Scoped to the key: another key's X-Request-Id names another job (and answer).
    job_id = scoped_job_id(caller, request_id)
    client = state.client
    if client is None or not _broker_open(client):
        # Fail at once: the client would retry the publish for 30 s meanwhile.
        unreachable = PublishFailed("the broker is unreachable")
        return _respond(answer_for_error(unreachable, job_id, request_id=request_id))
    if streamed is not None:
        return await stream_completion(
            request,
            client,
            streamed,
            job_id=job_id,
            request_id=request_id,
            options=options,
            sla_class=gw.sla_class,
        )
    try:
        reply = await client.call(
            body,
            job_id=job_id,
            # Fresh per HTTP request: two requests with the same X-Request-Id
            # must each get their own answer.
            correlation_id=uuid.uuid4().hex,
            sla_ms=options.sla_ms,
            sla_class=gw.sla_class,
            tenant=options.tenant,
            traceparent=options.traceparent,
            kind=kind,
        )
    except LlmqError as exc:
        return _respond(answer_for_error(exc, job_id, request_id=request_id))
    return _respond(answer_for_reply(reply, job_id, request_id=request_id))


async def _body_too_slow(request: web.Request, timeout_s: float) -> web.Response:
    """408, then the connection is closed: the rest of the body is not worth waiting for
    (aiohttp would otherwise linger, reading it, before closing)."""
    message = f"the request body did not arrive within {timeout_s:g} s"
    response = _respond(error_answer(408, REQUEST_TIMEOUT, message, retriable=True))
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # after the answer: close() sends what is buffered first
    return response


async def _models(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_STATE].models, content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if _broker_open(request.app[_STATE].client):
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "broker unavailable"}, status=503)


class StartupError(Exception):
    """The gateway could not start (broker unreachable, port taken); ``str()`` is one line."""


async def start_gateway(settings: Settings, *, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Connect to the broker and listen; returns the runner (to ``cleanup()``) and the port.

    ``port=0`` binds a free port: the returned one is the real one. Raises
    :class:`ConfigError` or :class:`StartupError`.
    """
    gw = settings.gateway
    runner = web.AppRunner(make_app(settings), shutdown_timeout=_SHUTDOWN_S)
    try:
        await runner.setup()  # runs the startup hooks: connects to the broker
    except Exception as exc:  # aiormq raises its own classes, not only OSError
        raise StartupError(_broker_problem(settings, exc)) from exc
    limits = ConnectionLimits(
        max_connections=gw.max_connections,
        header_timeout_s=gw.header_timeout_s,
        idle_timeout_s=gw.idle_timeout_s,
    )
    site = GatewaySite(runner, host, port, limits=limits)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return runner, site.port


async def serve(settings: Settings, *, host: str, port: int) -> None:
    """Run the gateway until SIGTERM or SIGINT, then let in-flight requests finish."""
    gw = settings.gateway
    problem = raise_fd_limit(gw.max_connections)
    if problem is not None:
        log.warning("gateway: %s", problem)
    runner, bound = await start_gateway(settings, host=host, port=port)
    log.info(
        "gateway listening on http://%s:%d (class %s, default SLA %d ms, max %d ms, %s)",
        host,
        bound,
        gw.sla_class,
        gw.default_sla_ms,
        gw.max_sla_ms,
        _keys_summary(settings),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received: finishing in-flight requests")
    finally:
        await runner.cleanup()


def _keys_summary(settings: Settings) -> str:
    gw = settings.gateway
    keys = len(gw.api_keys) + sum(len(k) for k in gw.tenant_keys.values())
    if not keys:
        return "no authentication"
    return f"API keys: {keys}, tenants: {len(gw.tenants)}"


def _broker_problem(settings: Settings, exc: BaseException) -> str:
    urls = settings.broker.addresses
    text = redact(str(exc) or type(exc).__name__, url_secrets(urls[0]))
    where = ", ".join(node_of(url) for url in urls)  # host:port only
    return f"cannot reach the broker at {where}: {text}"


@click.command("gateway")
@click.option("--config", "config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
@click.option("--host", default=None, help="Address to listen on (default: gateway.host).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="Port (default: gateway.port)."
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
def gateway_command(
    config: str | None, host: str | None, port: int | None, log_format: str
) -> None:
    """Serve the OpenAI-compatible HTTP API (chat completions, models) over llmq."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    problem = startup_problem(settings)
    if problem is not None:
        raise click.ClickException(problem)
    from schemas.logs import setup_logging

    setup_logging(settings.log_level, log_format)
    gw = settings.gateway
    try:
        event_loop.run(
            serve(settings, host=host or gw.host, port=gw.port if port is None else port)
        )
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
