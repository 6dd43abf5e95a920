"""Start-up checks of the broker against llmq's settings (docs/operations.md §7).

RabbitMQ closes a channel whose oldest unacknowledged delivery is older than
its consumer timeout and requeues every delivery on it. A worker holds a
delivery at most until the job's deadline, and no deadline is later than
``worker.max_sla_ms`` after the job was published; so the timeout must exceed
that, plus the broker's check interval. :func:`preflight` reads the timeout
from the management API (when ``broker.management_url`` is set) and returns
what it finds wrong; the worker logs it, or refuses to start with
``worker.strict_preflight``.

What the management API can tell: RabbitMQ 3.12 and later honour a per-queue
timeout (the ``x-consumer-timeout`` argument or a ``consumer-timeout``
policy) and report it on the queue; the broker-wide ``consumer_timeout`` of
``rabbitmq.conf`` is reported by no version. On 3.10 and 3.11 (which ignore
the per-queue settings) the check therefore cannot verify the timeout, and
says so. The decision (:func:`consumer_timeout_problem`) is pure; the
reading (:func:`read_consumer_timeout`) is the only I/O. Neither puts the
broker's password in a message.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp
import orjson

from schemas.codec import MAX_SLA_MS
from schemas.settings import Settings

__all__ = [
    "BROKER_TICK_MS",
    "consumer_timeout_problem",
    "longest_deadline_ms",
    "preflight",
    "read_consumer_timeout",
]

BROKER_TICK_MS = 60_000
"""The broker looks for timed-out deliveries about once a minute; the rule in
docs/operations.md §7 keeps that much above the longest deadline."""
_PER_QUEUE_SINCE = (3, 12)
"""The first RabbitMQ version that honours (and reports) a per-queue timeout."""
_HTTP_TIMEOUT_S = 5.0


def longest_deadline_ms(settings: Settings) -> int:
    """The longest a job's deadline can be after its publish time."""
    # worker.max_sla_ms may be absent from older settings: the codec's limit holds then.
    return int(getattr(settings.worker, "max_sla_ms", MAX_SLA_MS))


def _duration(ms: int) -> str:
    minutes, seconds = divmod(ms / 1000, 60)
    if not minutes:
        return f"{seconds:g} s"
    return f"{int(minutes)} min" + (f" {seconds:g} s" if seconds else "")


def consumer_timeout_problem(timeout_ms: int | None, longest_deadline_ms: int) -> str | None:
    """What is wrong with a consumer timeout of ``timeout_ms`` (None: unknown), or None."""
    need = longest_deadline_ms + BROKER_TICK_MS
    rule = (
        f"it must be at least {need} ms ({_duration(need)}): the longest job deadline"
        f" (worker.max_sla_ms, {longest_deadline_ms} ms) plus the broker's check"
        f" interval ({BROKER_TICK_MS} ms)"
    )
    if timeout_ms is None:
        return f"could not verify the broker's consumer_timeout; {rule}"
    if timeout_ms < need:
        return (
            f"the broker's consumer_timeout ({timeout_ms} ms, {_duration(timeout_ms)}) is too"
            f" short; {rule}. A job held longer is requeued with every delivery on its"
            " channel: raise consumer_timeout or lower worker.max_sla_ms"
        )
    return None


@dataclass(frozen=True, slots=True)
class _Reading:
    timeout_ms: int | None
    why: str
    """Where the value came from, or why there is none (never a credential)."""


@dataclass(frozen=True, slots=True)
class _Api:
    base: str
    """The management URL without credentials: safe to show."""
    vhost: str
    auth: dict[str, str]


def _api(settings: Settings) -> _Api | None:
    """The management API's address and credentials, from the settings alone."""
    raw = settings.broker.management_url
    if not raw:
        return None
    amqp = urlsplit(settings.broker.addresses[0])  # every address has the same account
    mgmt = urlsplit(str(raw).strip())
    # Credentials written into management_url win over the broker's, and are
    # cut out of the URL: it is shown in messages.
    source = mgmt if mgmt.username is not None else amqp
    user = f"{unquote(source.username or 'guest')}:{unquote(source.password or '')}"
    host = mgmt.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{mgmt.port}" if mgmt.port is not None else ""
    base = urlunsplit((mgmt.scheme, netloc, mgmt.path.rstrip("/"), "", ""))
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    return _Api(base, vhost, {"Authorization": "Basic " + base64.b64encode(user.encode()).decode()})


def _version(overview: Any) -> tuple[int, int] | None:
    if not isinstance(overview, dict):
        return None
    text = overview.get("rabbitmq_version")
    if not isinstance(text, str):
        return None
    parts = text.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def _queue_timeout(row: Any) -> int | None:
    """The smallest per-queue timeout a queue row names (argument or policy)."""
    if not isinstance(row, dict):
        return None
    found: list[int] = []
    for where, key in (
        ("arguments", "x-consumer-timeout"),
        ("effective_policy_definition", "consumer-timeout"),
    ):
        table = row.get(where)
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append(value)
    # The smaller is the one that can bite; which wins on the broker does not matter here.
    return min(found) if found else None


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _get(session: aiohttp.ClientSession, api: _Api, path: str) -> Any:
    async with session.get(api.base + path, headers=api.auth) as response:
        if response.status != 200:
            raise _Refused(response.status)
        return orjson.loads(await response.read())


async def _read(settings: Settings) -> _Reading:
    try:
        api = _api(settings)
    except ValueError:  # a port that is not a number; the text would quote the URL
        return _Reading(None, "broker.management_url is not a valid URL")
    if api is None:
        return _Reading(None, "broker.management_url is not set")
    queues = [settings.topology.queue_name(c) for c in sorted(settings.topology.classes)]
    vhost = quote(api.vhost, safe="")
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S)
        ) as session:
            version = _version(await _get(session, api, "/api/overview"))
            if version is None or version < _PER_QUEUE_SINCE:
                shown = "an unknown version" if version is None else f"{version[0]}.{version[1]}"
                return _Reading(
                    None,
                    f"RabbitMQ {shown} at {api.base} reports no consumer timeout; check"
                    " consumer_timeout in rabbitmq.conf",
                )
            rows = [
                await _get(session, api, f"/api/queues/{vhost}/{quote(q, safe='')}") for q in queues
            ]
    except _Refused as exc:
        return _Reading(None, f"the management API at {api.base} answered HTTP {exc.status}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        # The exception's text may quote the URL; its type is enough to act on.
        return _Reading(None, f"the management API at {api.base} failed: {type(exc).__name__}")
    timeouts = [_queue_timeout(row) for row in rows]
    if any(t is None for t in timeouts):
        return _Reading(
            None,
            "a work queue sets no x-consumer-timeout (argument or policy), and the"
            " broker-wide consumer_timeout is not reported over the management API",
        )
    return _Reading(min(t for t in timeouts if t is not None), "the work queues' timeout")


async def read_consumer_timeout(settings: Settings) -> int | None:
    """The consumer timeout (ms) the work queues have, or None when it cannot tell."""
    return (await _read(settings)).timeout_ms


async def preflight(settings: Settings) -> list[str]:
    """What the start-up checks find wrong (empty: nothing, or nothing to check).

    Without ``broker.management_url`` there is nothing to check. A timeout the
    check cannot read is reported as unverified, with the reason and the
    value the timeout needs.
    """
    if not settings.broker.management_url:
        return []
    reading = await _read(settings)
    problem = consumer_timeout_problem(reading.timeout_ms, longest_deadline_ms(settings))
    if problem is None:
        return []
    return [problem if reading.timeout_ms is not None else f"{problem} ({reading.why})"]
