"""State gossip: each worker's state message out, every peer's in.

:class:`Gossip` has its dependencies in its constructor: it reads the
router's endpoint snapshot and the spend limits' payload to build the
message (``workers/state.py``), and what peers say goes back into both: a
peer's ejections are held by this router too (``Router.observe_remote``),
its spend is folded into the limits. Sharing is an extra: without the state
exchange the worker routes on its own view.

Membership: the live workers are this one and every peer heard within the
last three intervals that has not said it is leaving. Each worker ranks the
origins the same way (sorted) and holds share ``index`` of ``count`` of every
endpoint's limits (``Router.share``), so the limits hold for the fleet. A
worker that hears a new origin answers at once with its own state, so a
joining worker learns the fleet within a round trip (``settle``) instead of
an interval; a worker that stops says so in its last message, after its jobs
drained, so its share passes to the others without waiting for silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from schemas.contract import CONTENT_TYPE
from workers.routing import Router
from workers.spend_limits import SpendLimits
from workers.state import StateBook, decode_state

__all__ = ["Gossip", "StateGossip"]

log = logging.getLogger("llmq.worker")

_FULL_SPEND_EVERY = 30
"""Send every origin's spend (anti-entropy) once per this many intervals."""


class Gossip:
    """This worker's side of the state exchange, wired to the router and the spend limits."""

    def __init__(
        self,
        *,
        exchange: str,
        interval_s: float,
        book: StateBook,
        router: Router,
        spend_limits: SpendLimits,
        status: Callable[[], Mapping[str, Any]],
        members: Callable[[int, int], None] | None = None,
    ) -> None:
        self.book = book
        self.router = router
        self.spend_limits = spend_limits
        self._status = status
        self._members = members
        self._use: dict[str, dict[str, tuple[float | None, float | None]]] = {}
        """Peer origin → what its rpm/tpm windows held, per endpoint, as it last said."""
        self.share = (0, 1)
        """This worker's rank among the live workers, and their number."""
        self.transport = StateGossip(
            exchange=exchange,
            origin=book.origin,
            interval_s=interval_s,
            build=self.state,
            heard=self.heard,
            changed=self._membership,
        )
        self.sharing = False

    def peer_count(self) -> int:
        return self.transport.peer_count()

    def _membership(self) -> None:
        live = self.transport.members()
        share = (live.index(self.transport.origin), len(live))
        me = self.transport.origin
        self._use = {o: use for o, use in self._use.items() if o in live}
        peers = {rank: self._use.get(o, {}) for rank, o in enumerate(live) if o != me}
        self.router.leave_room(len(live), peers)
        if share == self.share:
            return
        log.info(
            "fleet: %d live worker(s); this one holds share %d of every endpoint's limits",
            share[1],
            share[0] + 1,
        )
        self.share = share
        if self._members is not None:
            self._members(*share)

    async def settle(self, wait_s: float) -> None:
        """Give the peers ``wait_s`` to answer this worker's first state message."""
        if self.sharing:
            await asyncio.sleep(wait_s)

    async def start(
        self, publish: AbstractRobustConnection, consume: AbstractRobustConnection
    ) -> None:
        self.sharing = await self.transport.start(publish, consume)

    async def stop(self) -> None:
        await self.transport.stop()

    async def leave(self) -> None:
        """Tell the peers this worker is gone, so its share of the limits is theirs."""
        if self.sharing:
            await self.transport.leave()

    def state(self, full: bool) -> dict[str, Any]:
        """This worker's state message."""
        now = time.monotonic()
        state = self.book.build(
            statuses=self.router.snapshot(now=now),
            status=self._status(),
            now=now,
            interval_s=self.transport.interval_s,
            spend=self.spend_limits.payload(full=full),
        )
        if self.transport.leaving:
            state["leaving"] = True
        use = self.router.window_use(now=now)
        for endpoint in state["endpoints"]:
            rpm, tpm = use.get(endpoint["name"], (None, None))
            endpoint["rpm_used"], endpoint["tpm_used"] = rpm, tpm
        return state

    def heard(self, state: dict[str, Any]) -> None:
        """A peer's state: hold its ejections here too, fold in its spend."""
        now = time.monotonic()
        for endpoint, seconds in self.book.remote_ejections(state, now=now):
            self.router.observe_remote(endpoint, ejected_for_s=seconds, now=now)
        spend = state.get("spend")
        if isinstance(spend, dict):
            self.spend_limits.heard(spend)
        self._use[state["origin"]] = _window_use(state)


class StateGossip:
    """Publish ``build(full)`` every ``interval_s``; hand each peer's message to ``heard``."""

    def __init__(
        self,
        *,
        exchange: str,
        origin: str,
        interval_s: float,
        build: Callable[[bool], dict[str, Any]],
        heard: Callable[[dict[str, Any]], None],
        changed: Callable[[], None] | None = None,
    ) -> None:
        self.exchange = exchange
        self.origin = origin
        self.interval_s = interval_s
        self._build = build
        self._heard = heard
        self._changed = changed or (lambda: None)
        self.peers: dict[str, float] = {}
        """Peer origin → when last heard (monotonic)."""
        self.gone: set[str] = set()
        """Peers whose last message said they were leaving."""
        self.leaving = False
        self.sent = 0
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._publish: AbstractChannel | None = None
        self._consume: AbstractChannel | None = None
        self._answers: set[asyncio.Task[None]] = set()

    def peer_count(self) -> int:
        """Peers heard within the last three intervals."""
        horizon = time.monotonic() - 3 * self.interval_s
        return sum(1 for t in self.peers.values() if t >= horizon)

    def members(self) -> list[str]:
        """The live workers' origins, this one's included, in the order every worker uses."""
        horizon = time.monotonic() - 3 * self.interval_s
        live = [o for o, t in self.peers.items() if t >= horizon and o not in self.gone]
        return sorted([self.origin, *live])

    async def leave(self) -> None:
        """Tell the peers this worker is gone (its jobs drained): its share is theirs now."""
        if self._publish is None or self._publish.is_closed:
            return
        self.leaving = True
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.publish_now()

    async def start(
        self, publish: AbstractRobustConnection, consume: AbstractRobustConnection
    ) -> bool:
        """Bind a queue and start publishing; False (and a warning) when the broker refuses.

        Without the exchange, or without permission for ``<exchange>.*``
        queues, the worker routes on its own view: sharing is an extra.
        """
        self._consume = await consume.channel()
        try:
            exchange = await self._consume.get_exchange(self.exchange, ensure=True)
        except (aiormq.exceptions.ChannelNotFoundEntity, aio_pika.exceptions.ChannelClosed):
            log.warning(
                "state exchange %r does not exist: no shared state, health or budgets"
                " (run `llmq topology apply`)",
                self.exchange,
            )
            return False
        try:
            # Our own name (not server-named): a robust reconnect re-declares the same queue.
            queue = await self._consume.declare_queue(
                f"{self.exchange}.{uuid.uuid4().hex}",
                exclusive=True,
                auto_delete=True,
                arguments={"x-max-length": 1000, "x-message-ttl": _ttl_ms(self.interval_s)},
            )
            await queue.bind(exchange)
            await queue.consume(self._on_message, no_ack=True)
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.ChannelClosed) as exc:
            log.warning(
                "cannot join state exchange %r (%s): no shared state, health or budgets",
                self.exchange,
                type(exc).__name__,
            )
            return False
        self._publish = await publish.channel(publisher_confirms=False)
        self._task = asyncio.create_task(self._run())
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for channel in (self._publish, self._consume):
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def publish_now(self) -> None:
        """Send one state message now (also what the loop does each interval)."""
        assert self._publish is not None
        full = self.sent % _FULL_SPEND_EVERY == 0
        body = orjson.dumps(self._build(full))
        exchange = await self._publish.get_exchange(self.exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body, content_type=CONTENT_TYPE, expiration=_ttl_ms(self.interval_s) / 1000
            ),
            routing_key="",
        )
        self.sent += 1

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(max(5.0, self.interval_s)):
                    await self.publish_now()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost state message is superseded by the next
                (log.debug if self._failing else log.warning)(
                    "state message not sent: %s", type(exc).__name__
                )
                self._failing = True
            else:
                self._failing = False
            self._changed()  # a peer may have fallen silent
            # A little jitter keeps a fleet started together from publishing in bursts.
            await asyncio.sleep(self.interval_s * (0.9 + 0.2 * random.random()))

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        state = decode_state(message.body)
        if state is None or state["origin"] == self.origin:
            return
        origin = state["origin"]
        new = origin not in self.peers
        self.peers[origin] = time.monotonic()
        if state.get("leaving") is True:
            self.gone.add(origin)
        elif new and not self.leaving and self._publish is not None:
            # A worker joined: answer now, so it learns the fleet in a round trip.
            task = asyncio.create_task(self._answer())
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)
        try:
            self._heard(state)
        except Exception:
            log.exception("state message from %s not understood", state.get("worker"))
        self._changed()

    async def _answer(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(5.0, self.interval_s)):
                await self.publish_now()


def _ttl_ms(interval_s: float) -> int:
    """How long a state message is worth keeping: a few intervals."""
    return int(max(5.0, 5 * interval_s) * 1000)


def _window_use(state: Mapping[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """What a peer's state message says its rpm/tpm windows held, per endpoint."""
    found: dict[str, tuple[float | None, float | None]] = {}
    endpoints = state.get("endpoints")
    if not isinstance(endpoints, list):
        return found
    for e in endpoints:
        if isinstance(e, dict) and isinstance(e.get("name"), str):
            found[e["name"]] = (_number(e.get("rpm_used")), _number(e.get("tpm_used")))
    return found


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else None
