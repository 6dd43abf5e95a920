"""The gateway's HTTP server, hardened for callers that do not play fair.

aiohttp serves the requests; this module decides who gets a connection and
for how long, and what the logs say about it:

* **a connection cap**: past ``gateway.max_connections`` open connections, a
  new one gets ``503`` and is closed at once, so slow or idle clients cannot
  use up the process's file descriptors;
* **a header timeout**: a request's line and headers must arrive in full
  within ``gateway.header_timeout_s`` of the connection opening, or of the
  request's first byte on a kept-alive connection (a client that drip-feeds
  its headers is dropped);
* **an idle timeout**: aiohttp's keep-alive timeout, ``gateway.idle_timeout_s``;
* **access lines without query strings**, and aiohttp's complaints about
  malformed requests without the request text: either may carry a key.

The body timeout is the request handler's (``producers.gateway``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from producers.gateway_core import error_answer
from schemas.errors import ErrorCode
from schemas.exposition import listening_port
from schemas.secrets import redact

__all__ = ["AccessLog", "ConnectionLimits", "GatewaySite", "on_hangup", "raise_fd_limit"]

log = logging.getLogger("llmq.gateway")
access_log = logging.getLogger("llmq.gateway.access")
http_log = logging.getLogger("llmq.gateway.http")

_MAX_LOGGED_PATH = 256
_FD_RESERVE = 64  # the broker connection, the metrics port, logs, DNS: beside the callers
_WARN_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How many connections, and how long each may take to say what it wants."""

    max_connections: int = 1024
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0


def _refusal() -> bytes:
    answer = error_answer(
        503,
        ErrorCode.OVER_CAPACITY.value,
        "too many open connections; retry shortly",
        retriable=True,
        headers={"Retry-After": "1"},
    )
    body = orjson.dumps(answer.body)
    head = [
        "HTTP/1.1 503 Service Unavailable",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in answer.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REFUSAL = _refusal()


class _Doors:
    """Open connections, counted; a warning now and then while the cap turns callers away."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._warned_at = float("-inf")

    def refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "gateway: %d connections open (gateway.max_connections): refusing new ones"
                " (%d refused so far)",
                self.open,
                self.refused,
            )


class _Refused(asyncio.Protocol):
    """A connection past the cap: a 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSAL)
        transport.close()


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, counted and with a deadline for each request head.

    The deadline is armed when the connection opens and when the first byte of
    a request arrives on an idle kept-alive connection; it is met as soon as
    aiohttp has parsed a whole head (its request count moves). Between
    requests aiohttp's own keep-alive timer closes idle connections.
    """

    def __init__(
        self, manager: web.Server, *, doors: _Doors, header_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._doors = doors
        self._header_timeout_s = header_timeout_s
        self._head_due: asyncio.TimerHandle | None = None
        self._heads_when_armed = 0
        self._on_lost: list[Callable[[], None]] = []
        # Counted from creation, not from connection_made: asyncio may accept a
        # batch of connections before the first one's connection_made runs.
        doors.open += 1
        self._counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._doors.open -= 1
        self._disarm()
        super().connection_lost(exc)
        callbacks, self._on_lost = self._on_lost, []
        for callback in callbacks:
            callback()

    def on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the connection closes (soon, if it has); returns the undo."""
        if self.transport is None:
            return self._loop.call_soon(callback).cancel
        self._on_lost.append(callback)

        def undo() -> None:
            if callback in self._on_lost:
                self._on_lost.remove(callback)

        return undo

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_due is not None and self._request_count != self._heads_when_armed:
            self._disarm()  # a whole head arrived in time
        if self._head_due is None and self._awaiting_head():
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def _awaiting_head(self) -> bool:
        # aiohttp waits on this future between requests (its keep-alive check reads it too).
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm(self) -> None:
        self._disarm()
        self._heads_when_armed = self._request_count
        self._head_due = self._loop.call_later(self._header_timeout_s, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_due is not None:
            self._head_due.cancel()
            self._head_due = None

    def _head_overdue(self) -> None:
        self._head_due = None
        if self._request_count == self._heads_when_armed and self.transport is not None:
            http_log.debug("closing a connection whose request head is overdue")
            self.force_close()


def _nothing() -> None:
    pass


def on_hangup(request: web.BaseRequest, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` once if the caller's connection closes; returns the undo.

    aiohttp does not cancel a handler whose caller went away (it would only
    notice at the next write), so a streamed answer, which may wait long for
    its next token, asks to be told. Outside :class:`GatewaySite` (aiohttp's
    own test server), it is never called.
    """
    protocol = request.protocol
    if isinstance(protocol, _Handler):
        return protocol.on_lost(callback)
    return _nothing


class GatewaySite(web.BaseSite):
    """A TCP site whose connections are capped and timed (``runner.cleanup()`` stops it)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: ConnectionLimits,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._limits = limits
        self._doors = _Doors(limits.max_connections)
        self._bound_port: int | None = None

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    @property
    def port(self) -> int:
        """The bound port once started (``port=0`` picks a free one)."""
        return self._bound_port or self._port

    @property
    def open_connections(self) -> int:
        return self._doors.open

    async def start(self) -> None:
        await super().start()  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        limits = self._limits

        def connection() -> asyncio.BaseProtocol:
            if self._doors.open >= self._doors.limit:
                self._doors.refuse()
                return _Refused()
            return _Handler(
                server,
                loop=loop,
                doors=self._doors,
                header_timeout_s=limits.header_timeout_s,
                keepalive_timeout=limits.idle_timeout_s,
                access_log_class=AccessLog,
                access_log=access_log,
                access_log_format="",
                logger=http_log,
            )

        listening = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._server = listening
        self._bound_port = listening_port(listening)


class AccessLog(AbstractAccessLogger):
    """One line per request: client, method, path, status, bytes, seconds.

    Never the query string (``?api_key=…`` would be logged), never a header.
    """

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = loggable_path(request.raw_path)
        self.logger.info(
            '%s "%s %s" %d %d %.6f',
            request.remote,
            request.method,
            path,
            response.status,
            response.body_length,
            time,
            extra={
                "remote": request.remote,
                "method": request.method,
                "path": path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_s": round(time, 6),
            },
        )


def loggable_path(raw_path: str) -> str:
    """The request's path as it may be logged: no query string, nothing key-shaped, capped."""
    path, _, query = raw_path.partition("?")
    path = redact(path[:_MAX_LOGGED_PATH], ())
    return f"{path}?[redacted]" if query else path


class _NoRequestText(logging.Filter):
    """aiohttp quotes a malformed request's bytes in its error: keep only the error's kind."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = f"{record.msg}: {type(exc).__name__} ({exc.code})"
            record.exc_info = None
            record.exc_text = None
        return True


http_log.addFilter(_NoRequestText())


def raise_fd_limit(connections: int) -> str | None:
    """Raise the soft file-descriptor limit to fit ``connections``; a warning if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = connections + _FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target >= needed:
        return None
    return (
        f"the open-file limit ({target}) is below gateway.max_connections ({connections})"
        f" plus {_FD_RESERVE}: lower max_connections or raise the limit (ulimit -n)"
    )
