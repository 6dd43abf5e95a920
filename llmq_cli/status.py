"""``llmq status``: the fleet at a glance, from the broker alone.

* **Queues**: ready jobs per work queue and consumers, by a passive declare
  (needs nothing but AMQP). The age of the oldest job needs the management
  API: with ``broker.management_url`` set, ``/api/queues`` gives
  ``head_message_timestamp`` and the unacknowledged count; without it the
  view says so and shows depths only.
* **Workers** and **endpoints**: every worker publishes its state about once
  a second on ``topology.state_exchange`` (``workers.state``); this command
  binds its own exclusive queue there and listens. Per endpoint it shows the
  state each worker sees, in-flight requests, the predicted latency (the
  routing cost), its share of the fleet's recent attempts and the failure
  kinds of the last ~30 s.
* **Dead letters**: the depth of ``topology.dead_queue``; **budgets**: the
  fleet's spend this month, merged from the workers' G-counters.

``--once`` prints one view, ``--json`` one JSON document (for scripts and
tests); otherwise a rich live view refreshes every second until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import aiohttp
import aiormq
import click
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from schemas.broker.connection import open_connection
from schemas.secrets import redact, redact_url, url_secrets
from schemas.settings import ConfigError, Settings, load_settings
from workers.routing.spend import SpendLedger, SpendLimit
from workers.state import decode_state

__all__ = ["StatusReader", "status_command", "summarize"]

_STATE_ORDER = ("closed", "cooldown", "half_open", "unusable", "open")
"""Endpoint states, best to worst: the fleet view shows the worst any worker sees."""
_STALE_INTERVALS = 5
_NO_AGE = "unavailable: set broker.management_url for queue ages"


@dataclass(slots=True)
class QueueInfo:
    name: str
    role: str
    """An SLA class, or ``dead``."""
    ready: int | None = None
    consumers: int | None = None
    unacked: int | None = None
    oldest_age_s: float | None = None
    problem: str | None = None


@dataclass(slots=True)
class Observed:
    """What one look at the broker found."""

    queues: list[QueueInfo]
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Latest state message per worker origin."""
    received_at: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    age_source: str = _NO_AGE


# --- pure: what the view shows ---------------------------------------------------------


def summarize(observed: Observed, settings: Settings, *, now: float) -> dict[str, Any]:
    """The status document (what ``--json`` prints) from what was observed.

    ``now`` is wall-clock seconds; states older than five of their intervals
    are dropped (the worker is gone).
    """
    states = [
        s
        for origin, s in sorted(observed.states.items())
        if now - observed.received_at.get(origin, now)
        <= _STALE_INTERVALS * float(s.get("interval_s") or 1.0)
    ]
    workers = [
        {
            "worker": s.get("worker"),
            "origin": s.get("origin"),
            "in_flight": s.get("in_flight", 0),
            "ok": s.get("ok", 0),
            "errors": s.get("errors", 0),
            "dead_letters": s.get("dead_letters", 0),
            "by_code": s.get("by_code", {}),
            "age_s": round(max(0.0, now - float(s.get("sent_at") or now)), 3),
        }
        for s in states
    ]
    endpoints = _endpoints(states)
    notes = list(observed.notes)
    if not states and not notes:
        notes.append(f"no worker heard on {settings.topology.state_exchange!r}")
    dead = next((q for q in observed.queues if q.role == "dead"), None)
    return {
        "at": round(now, 3),
        "queues": [
            {
                "name": q.name,
                "class": q.role,
                "ready": q.ready,
                "unacked": q.unacked,
                "consumers": q.consumers,
                "oldest_age_s": q.oldest_age_s,
                **({"problem": q.problem} if q.problem else {}),
            }
            for q in observed.queues
        ],
        "queue_age": observed.age_source,
        "dead_letters": None if dead is None else dead.ready,
        "workers": workers,
        "endpoints": endpoints,
        "budgets": _budgets(states, settings),
        "notes": notes,
    }


def _endpoints(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    total_recent = 0
    for s in states:
        for e in s.get("endpoints") or []:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                continue
            m = merged.setdefault(
                e["name"],
                {
                    "name": e["name"],
                    "state": "closed",
                    "by_worker": {},
                    "in_flight": 0,
                    "predicted": [],
                    "recent_attempts": 0,
                    "errors": {},
                },
            )
            state = str(e.get("state", "closed"))
            m["by_worker"][str(s.get("worker"))] = state
            if _rank(state) > _rank(m["state"]):
                m["state"] = state
            m["in_flight"] += int(e.get("in_flight") or 0)
            if e.get("predicted_s") is not None:
                m["predicted"].append(float(e["predicted_s"]))
            recent = int(e.get("recent_attempts") or 0)
            m["recent_attempts"] += recent
            total_recent += recent
            for kind, n in (e.get("errors") or {}).items():
                m["errors"][kind] = m["errors"].get(kind, 0) + int(n)
    out = []
    for name in sorted(merged):
        m = merged[name]
        predicted = m.pop("predicted")
        m["predicted_s"] = round(sum(predicted) / len(predicted), 4) if predicted else None
        m["share"] = round(m["recent_attempts"] / total_recent, 4) if total_recent else 0.0
        out.append(m)
    return out


def _rank(state: str) -> int:
    return _STATE_ORDER.index(state) if state in _STATE_ORDER else 0


def _budgets(states: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    cfg = settings.budgets
    budgets = [SpendLimit("model", n, b.monthly_usd, b.hard_cap) for n, b in cfg.models.items()] + [
        SpendLimit("tenant", n, b.monthly_usd, b.hard_cap) for n, b in cfg.tenants.items()
    ]
    ledger = SpendLedger(budgets, origin="llmq-status", thresholds=())
    months = [s["spend"].get("month") for s in states if isinstance(s.get("spend"), dict)]
    month = max((m for m in months if isinstance(m, str)), default=None)
    if month is not None:
        for s in states:
            spend = s.get("spend")
            if isinstance(spend, dict):
                ledger.merge(spend, month=month)
    return [
        {
            "scope": b.scope,
            "name": b.name,
            "month": month,
            "spent_usd": round(spent, 6),
            "limit_usd": b.limit_usd,
            "fraction": round(spent / b.limit_usd, 4),
            "hard_cap": b.hard_cap,
        }
        for b, spent in ledger.view()
    ]


# --- I/O: looking at the broker --------------------------------------------------------


class StatusReader:
    """Holds a connection and a state queue; ``look()`` returns what is there now."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connection: AbstractConnection | None = None
        self._listening: AbstractChannel | None = None
        self._states: dict[str, dict[str, Any]] = {}
        self._received: dict[str, float] = {}
        self._notes: list[str] = []

    async def __aenter__(self) -> StatusReader:
        url = self.settings.broker.addresses
        # Frames read through the guard (schemas/broker/frames.py): anyone who may publish
        # to the state exchange could otherwise end this connection with one message.
        self._connection = await open_connection(url, name="llmq-status")
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _listen(self) -> None:
        assert self._connection is not None
        name = self.settings.topology.state_exchange
        self._listening = await self._connection.channel()
        try:
            exchange = await self._listening.get_exchange(name, ensure=True)
        except (aiormq.exceptions.ChannelNotFoundEntity, aio_pika.exceptions.ChannelClosed):
            self._notes.append(f"state exchange {name!r} does not exist: no worker state")
            return
        queue = await self._listening.declare_queue(
            f"{name}.status-{uuid.uuid4().hex[:12]}",
            exclusive=True,
            auto_delete=True,
            arguments={"x-max-length": 1000},
        )
        await queue.bind(exchange)
        await queue.consume(self._on_state, no_ack=True)

    async def _on_state(self, message: AbstractIncomingMessage) -> None:
        state = decode_state(message.body)
        if state is not None:
            self._states[state["origin"]] = state
            self._received[state["origin"]] = time.time()

    async def look(self) -> Observed:
        """Queue depths now, and the latest state of every worker heard so far."""
        queues = await self._queues()
        observed = Observed(
            queues=queues,
            states=dict(self._states),
            received_at=dict(self._received),
            notes=list(self._notes),
        )
        if self.settings.broker.management_url:
            await self._management(observed)
        return observed

    async def _queues(self) -> list[QueueInfo]:
        assert self._connection is not None
        topo = self.settings.topology
        wanted = [QueueInfo(topo.queue_name(c), c) for c in sorted(topo.classes)]
        wanted.append(QueueInfo(topo.dead_queue, "dead"))
        for q in wanted:
            # A passive declare of a missing queue closes the channel: one channel each.
            channel = await self._connection.channel()
            try:
                declared = await channel.declare_queue(q.name, passive=True)
                q.ready = declared.declaration_result.message_count or 0
                q.consumers = declared.declaration_result.consumer_count or 0
            except (aiormq.exceptions.ChannelNotFoundEntity, aio_pika.exceptions.ChannelClosed):
                q.problem = "does not exist (run `llmq topology apply`)"
            finally:
                if not channel.is_closed:
                    await channel.close()
        return wanted

    async def _management(self, observed: Observed) -> None:
        """Unacked counts and the oldest job's age from ``/api/queues/<vhost>``."""
        api, auth, base = _management_request(self.settings)
        columns = "name,messages_ready,messages_unacknowledged,consumers,head_message_timestamp"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(api, params={"columns": columns}, headers=auth) as response,
            ):
                if response.status != 200:
                    observed.notes.append(f"management API: HTTP {response.status} from {base}")
                    observed.age_source = "unavailable: the management API refused (see notes)"
                    return
                rows = await response.json(loads=orjson.loads)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            # The type only: a library's text may quote the URL it was given.
            observed.notes.append(f"management API unreachable at {base}: {type(exc).__name__}")
            observed.age_source = "unavailable: the management API is unreachable (see notes)"
            return
        by_name = {r.get("name"): r for r in rows if isinstance(r, dict)}
        now = time.time()
        for q in observed.queues:
            row = by_name.get(q.name)
            if row is None:
                continue
            q.unacked = row.get("messages_unacknowledged")
            head = row.get("head_message_timestamp")
            if isinstance(head, int | float) and head > 0:
                q.oldest_age_s = round(max(0.0, now - float(head)), 3)
            elif q.ready == 0:
                q.oldest_age_s = 0.0
        observed.age_source = "management"


def _management_request(settings: Settings) -> tuple[str, dict[str, str], str]:
    """The queues API's URL (no credentials in it), its Basic auth header, and the base
    URL as it may be shown (no password).

    The credentials are the management URL's own when it has some, else the
    broker URL's.
    """
    broker = urlsplit(settings.broker.addresses[0])  # every address has the same account
    vhost = unquote(broker.path[1:]) if len(broker.path) > 1 else "/"
    given = str(settings.broker.management_url).rstrip("/")
    shown = redact_url(given)
    try:
        parts = urlsplit(given)
        has_user = parts.username is not None
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return given, {}, shown  # aiohttp refuses it; the note names only the error's type
    creds = parts if has_user else broker
    user = f"{unquote(creds.username or 'guest')}:{unquote(creds.password or '')}"
    auth = {"Authorization": "Basic " + base64.b64encode(user.encode()).decode()}
    base = urlunsplit(parts._replace(netloc=netloc))
    return f"{base}/api/queues/{quote(vhost, safe='')}", auth, shown


async def snapshot(settings: Settings, *, listen_s: float) -> dict[str, Any]:
    """One status document after listening ``listen_s`` seconds for worker states."""
    async with StatusReader(settings) as reader:
        await asyncio.sleep(listen_s)
        observed = await reader.look()
    return summarize(observed, settings, now=time.time())


# --- rendering ---------------------------------------------------------------------------


def render(doc: dict[str, Any]) -> Any:
    """The status document as rich tables."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    queues = Table(title="Queues", title_justify="left", expand=False)
    for col in ("queue", "class", "ready", "unacked", "consumers", "oldest"):
        queues.add_column(col, justify="left" if col in ("queue", "class") else "right")
    for q in doc["queues"]:
        queues.add_row(
            q["name"],
            q["class"],
            _num(q["ready"]) if not q.get("problem") else Text(q["problem"], style="red"),
            _num(q["unacked"]),
            _num(q["consumers"]),
            "—" if q["oldest_age_s"] is None else f"{q['oldest_age_s']:.1f} s",
        )
    parts: list[Any] = [queues]
    if doc["queue_age"] != "management":
        parts.append(Text(f"queue ages {doc['queue_age']}", style="dim"))

    workers = Table(title=f"Workers ({len(doc['workers'])})", title_justify="left")
    for col in ("worker", "in flight", "ok", "errors", "dead letters", "seen"):
        workers.add_column(col, justify="left" if col == "worker" else "right")
    for w in doc["workers"]:
        workers.add_row(
            str(w["worker"]),
            str(w["in_flight"]),
            str(w["ok"]),
            str(w["errors"]),
            str(w["dead_letters"]),
            f"{w['age_s']:.1f} s ago",
        )
    parts.append(workers)

    endpoints = Table(title="Endpoints (all workers)", title_justify="left")
    for col in ("endpoint", "state", "in flight", "predicted", "share", "recent errors"):
        endpoints.add_column(col, justify="right" if col in ("in flight", "share") else "left")
    for e in doc["endpoints"]:
        states = sorted(e["by_worker"].values())
        summary = ", ".join(f"{s}×{states.count(s)}" for s in dict.fromkeys(states))
        style = {"open": "red", "half_open": "yellow", "cooldown": "yellow"}.get(e["state"], "")
        endpoints.add_row(
            e["name"],
            Text(summary, style=style),
            str(e["in_flight"]),
            "—" if e["predicted_s"] is None else f"{e['predicted_s'] * 1000:.0f} ms",
            f"{e['share'] * 100:.0f}%",
            ", ".join(f"{k}:{n}" for k, n in sorted(e["errors"].items())) or "",
        )
    parts.append(endpoints)

    if doc["budgets"]:
        budgets = Table(title="Budgets (this month, fleet)", title_justify="left")
        for col in ("budget", "spent", "limit", "used", "hard cap"):
            budgets.add_column(col, justify="left" if col == "budget" else "right")
        for b in doc["budgets"]:
            budgets.add_row(
                f"{b['scope']} {b['name']}",
                f"{b['spent_usd']:.2f} $",
                f"{b['limit_usd']:.2f} $",
                f"{b['fraction'] * 100:.0f}%",
                "yes" if b["hard_cap"] else "no",
            )
        parts.append(budgets)
    parts.append(Text(f"dead letters: {_num(doc['dead_letters'])}", style="bold"))
    parts.extend(Text(n, style="yellow") for n in doc["notes"])
    return Group(*parts)


def _num(value: int | None) -> str:
    return "—" if value is None else str(value)


async def _live(settings: Settings) -> None:
    from rich.live import Live

    async with StatusReader(settings) as reader:
        with Live(render(summarize(await reader.look(), settings, now=time.time()))) as live:
            while True:
                await asyncio.sleep(1.0)
                live.update(render(summarize(await reader.look(), settings, now=time.time())))


@click.command("status")
@click.option("--config", "config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
@click.option("--once", is_flag=True, help="Print one view and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document and exit.")
@click.option(
    "--listen",
    type=click.FloatRange(0.0, 60.0),
    default=None,
    help="Seconds to listen for worker states before printing (default 2.2 intervals).",
)
def status_command(config: str | None, once: bool, as_json: bool, listen: float | None) -> None:
    """Queue depths, workers, endpoints across all workers, budgets, dead letters."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    listen_s = 2.2 * settings.worker.state_interval_s if listen is None else listen
    try:
        if as_json or once:
            doc = asyncio.run(snapshot(settings, listen_s=listen_s))
            if as_json:
                click.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
            else:
                from rich.console import Console

                Console().print(render(doc))
            return
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_live(settings))
    except (ConnectionError, OSError, aiormq.exceptions.AMQPConnectionError) as exc:
        text = redact(str(exc), url_secrets(settings.broker.addresses[0]))
        raise click.ClickException(f"cannot reach the broker: {text}") from None
