"""The router worker: consume jobs, serve them, settle each delivery exactly once.

The worker is the shell that owns the connections, the consumers and the
routing half of serving a job: the deadline, the model, the model's limits,
the spend hold, then the dispatcher (attempts, retries, hedges) and the
answer's cost. Deciding what a delivery is (``workers/intake.py``) and
settling it (``workers/deliveries.py``) live beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import replace
from typing import Any

from aio_pika.abc import AbstractQueue, AbstractRobustConnection

from schemas.broker.connection import connect
from schemas.broker.publisher import Publisher
from schemas.codec import Job, encode_reply, error_body
from schemas.contract import JobKind, SlaClass
from schemas.errors import ErrorCode
from schemas.settings import ConfigError, Settings
from schemas.stream import encode_part
from schemas.topology import plan
from workers.attempts import Dispatcher, Failed, Served, Streaming
from workers.coalescer import CoalescePolicy
from workers.deliveries import Deliveries, WorkerStats
from workers.events import ObservedRetryBudget
from workers.gossip import Gossip
from workers.intake import Intake, admission
from workers.outcome import Outcome, Route, RoutingRecord, failure
from workers.preflight import preflight
from workers.providers import UpstreamReply, adapter_for
from workers.providers.chunks import usage_counts
from workers.relay import StreamRelay
from workers.routing import EndpointSpec, Router, RoutingConfig
from workers.routing.spend import Hold
from workers.spend_gate import SpendGate
from workers.spend_store import SpendStore
from workers.telemetry import Telemetry
from workers.tracing import traced
from workers.upstream import Upstream, make_upstream

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("llmq.worker")


_JOIN_S = 0.2
"""How long a starting worker listens for its peers' answers before consuming."""


def prefetch(settings: Settings, sla_class: str) -> int:
    """The class's consumer prefetch: ``worker.concurrency`` interactive jobs,
    and ``worker.batch_share`` of that in batch jobs besides.

    Interactive keeps the whole ``concurrency`` rather than splitting it with
    batch: a worker that only sees interactive traffic (the usual case) would
    otherwise hold half the jobs it was told to, and a batch backlog still
    cannot take interactive room, as each class has its own consumer. Batch
    gets a bounded share so one worker does not hoard a backlog its peers could
    start; the endpoints' limits, not prefetch, bound the upstream calls.
    """
    interactive = settings.worker.concurrency
    if sla_class == SlaClass.BATCH:
        return max(1, round(interactive * settings.worker.batch_share))
    return interactive


def routing_config(settings: Settings) -> RoutingConfig:
    """The routing core's configuration from the worker's settings."""
    w = settings.worker
    return RoutingConfig(
        max_attempts=w.max_attempts,
        budget_ratio=w.retry_budget_ratio,
        budget_min_per_s=w.retry_budget_min_per_s,
        deadline_margin_s=w.deadline_margin_ms / 1000,
        eject_base_s=w.eject_base_s,
    )


class Worker:
    """One worker process's consuming and routing state."""

    def __init__(
        self,
        settings: Settings,
        *,
        upstream: Upstream | None = None,
        name: str | None = None,
        declare_topology: bool = True,
        routing: RoutingConfig | None = None,
    ) -> None:
        self.settings = settings
        self.name = name or settings.worker.name or f"{socket.gethostname()}:{os.getpid()}"
        self.stats = WorkerStats()
        self._declare = declare_topology
        self._upstream = upstream
        # Built now: URLs and headers once per endpoint, and a kind this install
        # cannot speak is a ConfigError before any connection is opened.
        self._adapters = {e.name: adapter_for(e) for e in settings.endpoints}
        config = routing or routing_config(settings)
        self.router = Router(
            [EndpointSpec.from_settings(e) for e in settings.endpoints],
            settings.models,
            config,
            rand=random.random,
        )
        budget = ObservedRetryBudget(
            config.budget_ratio,
            config.budget_min_per_s,
            config.budget_ttl_s,
            batch_keep=config.batch_budget_share,
        )
        self.retry_budget = budget
        self.telemetry = Telemetry(
            settings,
            name=self.name,
            router=self.router,
            retry_budget=budget,
            status=self.status,
        )
        budget.hook = self.telemetry.hook
        self.admission = admission(settings)
        self.gossip = Gossip(
            exchange=settings.topology.state_exchange,
            interval_s=settings.worker.state_interval_s,
            book=self.telemetry.book,
            router=self.router,
            spend_limits=self.telemetry.spend_limits,
            status=self.status,
            members=self._share,
        )
        self.telemetry.peers = self.gossip.peer_count
        self.spend_store = SpendStore(
            settings.topology.spend_stream,
            self.telemetry.spend_limits,
            state_interval_s=settings.worker.state_interval_s,
        )
        self.spend = SpendGate(
            settings,
            self.telemetry.spend_limits,
            default_max_tokens=config.default_max_tokens,
            hook=self.telemetry.hook,
        )
        self._hedge = {k: c.hedge for k, c in settings.topology.classes.items()}
        route: Route = self._route
        if self.telemetry.tracer.enabled:
            route = traced(self.telemetry.tracer, route)
        self.deliveries = Deliveries(
            Intake.from_settings(settings, self.admission),
            route,
            name=self.name,
            dead_exchange=settings.topology.dead_exchange,
            delivery_limit=settings.topology.delivery_limit,
            hook=self.telemetry.hook,
            stats=self.stats,
        )
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._consume_conn: AbstractRobustConnection | None = None
        self._publish_conn: AbstractRobustConnection | None = None
        self._dispatcher: Dispatcher | None = None
        self._relay = StreamRelay(
            lambda: self.deliveries.publisher,
            CoalescePolicy(
                max_delay_s=settings.worker.stream_flush_ms / 1000,
                max_tokens=settings.worker.stream_flush_tokens,
            ),
            gap_s=settings.worker.stream_gap_s,
        )
        self._stopping = False

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Worker {self.name} ok={s.ok} errors={s.errors} dead_letters={s.dead_letters}"
            f" requeued={s.requeued} in_flight={s.in_flight}>"
        )

    @property
    def metrics_port(self) -> int | None:
        """The port of ``/metrics``, ``/healthz`` and ``/readyz`` once started (None if off)."""
        return self.telemetry.port

    async def start(self) -> None:
        """Check the broker's limits, connect, declare the topology, start consuming.

        Raises :class:`ConfigError` when ``worker.strict_preflight`` is set and a
        start-up check fails (otherwise each problem is a warning).
        """
        problems = await preflight(self.settings)
        for problem in problems:
            log.warning("preflight: %s", problem)
        if problems and self.settings.worker.strict_preflight:
            raise ConfigError(f"preflight failed (worker.strict_preflight): {problems[0]}")
        url = self.settings.broker.addresses  # the nodes of one cluster, tried in turn
        hb = self.settings.broker.heartbeat_s
        self._publish_conn = await connect(url, name=f"llmq-worker-pub {self.name}", heartbeat_s=hb)
        self._consume_conn = await connect(url, name=f"llmq-worker {self.name}", heartbeat_s=hb)
        self._consume_conn.reconnect_callbacks.add(self._reconnected)
        if self._declare:
            from schemas.broker.topology import apply_topology

            await apply_topology(self._publish_conn, plan(self.settings.topology))
        self.deliveries.publisher = await Publisher.open(self._publish_conn)
        upstream = self._upstream or make_upstream(self.settings.worker.http_transport)
        self._upstream = upstream
        self._dispatcher = Dispatcher(
            router=self.router,
            budget=self.retry_budget,
            upstream=upstream,
            adapters=self._adapters,
            max_attempts=self.router.config.max_attempts,
            margin_s=self.router.config.deadline_margin_s,
            clock=time.monotonic,
            rand=random.random,
            hook=self.telemetry.hook,
        )
        await self.telemetry.start(ready=self._ready)
        await self.gossip.start(self._publish_conn, self._consume_conn)
        await self.spend_store.start(self._publish_conn, self._consume_conn)  # before any job
        # Peers answer a new worker at once: learn the fleet (and so this worker's
        # share of every endpoint's limits) before taking any job.
        await self.gossip.settle(_JOIN_S)
        topo = self.settings.topology
        for sla_class in sorted(topo.classes):
            # One channel per queue: a channel error requeues only that queue's jobs.
            channel = await self._consume_conn.channel()
            await channel.set_qos(prefetch_count=prefetch(self.settings, sla_class))
            queue = await channel.get_queue(topo.queue_name(sla_class), ensure=True)
            tag = await queue.consume(self.deliveries.on_message, no_ack=False)
            self._consumers.append((queue, tag))
        log.info(
            "worker %s serving %s via %s",
            self.name,
            ", ".join(f"{e.name}[{','.join(sorted(e.models))}]" for e in self.settings.endpoints),
            ", ".join(topo.queue_name(c) for c in sorted(topo.classes)),
        )
        for price in self.spend.prices:  # what cost_usd and the budgets will count
            log.info("price %s", price.describe())
            if price.warning:
                log.warning("%s", price.warning)

    def _share(self, index: int, count: int) -> None:
        """The live workers changed: hold share ``index`` of ``count`` of the fleet's limits."""
        self.router.share(index, count, now=time.monotonic())
        self.retry_budget.share(1 / count)

    def _reconnected(self, *_: object) -> None:
        self.stats.reconnects += 1
        log.warning(
            "worker %s reconnected to the broker (%d so far)", self.name, self.stats.reconnects
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop consuming, let in-flight jobs finish within ``grace_s``, requeue the rest."""
        self._stopping = True
        grace = self.settings.worker.grace_s if grace_s is None else grace_s
        for queue, tag in self._consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumers.clear()
        await self.deliveries.drain(grace)
        await self.spend_store.stop()  # after the drain: the last snapshot has every job
        await self.gossip.leave()  # after the drain: nothing of ours is in flight now
        await self.gossip.stop()
        await self.telemetry.stop()
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        if self._upstream is not None:
            await self._upstream.aclose()
        log.info("worker %s stopped: %r", self.name, self)

    async def _route(self, job: Job, now_ms: int) -> Outcome:
        """The deadline, the model, its limits, the spend gate, then the dispatcher."""
        queue_ms = max(0, now_ms - job.published_ms)
        if now_ms >= job.deadline_ms:
            why = "deadline passed while queued"
            return failure(
                job.job_id, ErrorCode.DEADLINE_EXCEEDED, why, RoutingRecord(queue_ms), job=job
            )
        model = self.router.resolve(job.model)
        if model is None:
            why = f"no endpoint serves model {job.model[:100]!r}"
            return failure(
                job.job_id, ErrorCode.UNKNOWN_MODEL, why, RoutingRecord(queue_ms), job=job
            )
        if job.stream and job.reply_to is None:
            # Nobody to stream to (the job ends as a dead letter): serve it whole.
            body = {k: v for k, v in job.body.items() if k not in ("stream", "stream_options")}
            job = replace(job, stream=False, body=body)
        record = RoutingRecord(queue_ms, model)
        too_much = self.admission.limit(model, job.output_cap, job.n, job.kind)
        if too_much is not None:
            return failure(job.job_id, ErrorCode.INVALID_REQUEST, too_much, record, job=job)
        if job.output_cap is None and job.kind is JobKind.CHAT:
            cap = self.admission.output_cap(model, None)
            if cap is not None:  # the model's limit holds for jobs that did not say
                job = replace(job, body={**job.body, "max_completion_tokens": cap}, output_cap=cap)
        hold = self.spend.before(job, model)
        if isinstance(hold, str):
            return failure(job.job_id, ErrorCode.OVER_BUDGET, hold, record, job=job)
        try:  # this is the hold's one owner: charged on success, released always
            assert self._dispatcher is not None
            deadline = time.monotonic() + (job.deadline_ms - now_ms) / 1000
            hedge = self._hedge.get(job.sla_class, False)
            result = await self._dispatcher.run(job, model, deadline=deadline, hedge=hedge)
            if isinstance(result, Served) and isinstance(result.reply, Streaming):
                return await self._stream(job, result, result.reply, hold, queue_ms, deadline)
            total_ms = round((time.time() * 1000) - job.published_ms, 3)
            if isinstance(result, Failed):
                self.spend.failed(hold, job, result)  # attempts billed but not answered
                record = RoutingRecord(
                    queue_ms,
                    result.model or model,
                    result.endpoint,
                    result.attempts,
                    result.hedged,
                    total_ms=total_ms,
                )
                return failure(
                    job.job_id, result.code, result.message, record, result.attempts, job
                )
            cost = self.spend.after(hold, job, result)
            return self._answer(job, result, queue_ms, total_ms, cost)
        finally:
            self.spend.release(hold)

    async def _stream(
        self,
        job: Job,
        served: Served,
        streaming: Streaming,
        hold: Hold,
        queue_ms: float,
        deadline: float,
    ) -> Outcome:
        """Relay a stream past its first token; its last part is the outcome's reply."""
        assert self._dispatcher is not None
        relayed = None
        try:
            relayed = await self._relay.relay(
                job, streaming.opened, run=uuid.uuid4().hex, deadline=deadline
            )
        finally:
            if relayed is None:  # cancelled (shutdown) or a bug: no sample
                self._dispatcher.end_stream(streaming, cancelled=True)
        failure = relayed.failure
        prompt, completion, cached = usage_counts(relayed.usage)
        if completion is None:
            completion = relayed.tokens  # no usage from the upstream: count chunks
        if relayed.gone is not None:
            self._dispatcher.end_stream(streaming, cancelled=True)
        elif failure is not None:
            self._dispatcher.end_stream(streaming, failure=failure.kind)
        else:
            self._dispatcher.end_stream(streaming, output_tokens=completion)
        # Billed whatever became of it: the upstream produced these tokens.
        served = replace(served, reply=UpstreamReply({}, prompt, completion, cached))
        cost = self.spend.after(hold, job, served)
        total_ms = round((time.time() * 1000) - job.published_ms, 3)
        record = self._record(served, queue_ms, total_ms, cost)
        whole = failure is None and relayed.gone is None
        code = None if whole else ErrorCode.STREAM_INTERRUPTED
        why = "" if whole else (relayed.gone or f"broke off after {relayed.seq} part(s): {failure}")
        body = encode_part(
            job.job_id,
            relayed.run,
            relayed.seq,
            relayed.tail,
            last=True,
            finish_reason=relayed.finish_reason if whole else None,
            usage=relayed.usage,
            routing=record.wire(),
            error=None if code is None else error_body(code, why),
        )
        return Outcome(
            job.job_id, body, code, why, served.attempts, job, record, reply_to=job.reply_to
        )

    def _record(
        self, served: Served, queue_ms: float, total_ms: float, cost: float | None
    ) -> RoutingRecord:
        reply = served.reply
        assert isinstance(reply, UpstreamReply)
        return RoutingRecord(
            queue_ms,
            served.model,
            served.endpoint,
            served.attempts,
            served.hedged,
            upstream_ms=round(served.upstream_ms, 3),
            total_ms=total_ms,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            cost_usd=cost,
            via=served.via,
        )

    def _answer(
        self, job: Job, served: Served, queue_ms: float, total_ms: float, cost: float | None
    ) -> Outcome:
        record = self._record(served, queue_ms, total_ms, cost)
        assert isinstance(served.reply, UpstreamReply)
        body = encode_reply(job.job_id, response=served.reply.body, routing=record.wire())
        return Outcome(
            job.job_id,
            body,
            attempts=served.attempts,
            job=job,
            routing=record,
            reply_to=job.reply_to,
        )

    def status(self) -> dict[str, Any]:
        """Health as data, for logs, ``llmq status`` and probes."""
        return {
            "worker": self.name,
            "ok": self.stats.ok,
            "errors": self.stats.errors,
            "dead_letters": self.stats.dead_letters,
            "requeued": self.stats.requeued,
            "reconnects": self.stats.reconnects,
            "in_flight": self.stats.in_flight,
            "duplicates": self.stats.duplicates,
            "by_code": dict(self.stats.by_code),
        }

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready: both broker connections up and every queue consumed (``/readyz``)."""
        broker = all(
            c is not None and not c.is_closed and c.connected.is_set()
            for c in (self._consume_conn, self._publish_conn)
        )
        consuming = bool(self._consumers) and not self._stopping
        ok = broker and consuming
        return ok, {
            "status": "ready" if ok else "not ready",
            "broker": broker,
            "consumers": len(self._consumers),
            "stopping": self._stopping,
            "state_shared": self.gossip.sharing,
        }
