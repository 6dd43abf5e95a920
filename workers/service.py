"""The router worker: consume jobs, serve them, settle each delivery exactly once.

Per delivery: decode → check the deadline → resolve the model → dispatch
(attempts, retries, hedges) → settle. Settling publishes the reply and, for
failures, the dead-letter copy, each confirmed by the broker, and only then
acks. If the broker cannot take them the delivery is not acked and comes
back (at-least-once); callers dedupe replies by job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from schemas.broker.connection import connect
from schemas.broker.errors import BrokerFailure, Refused, Unroutable
from schemas.broker.frames import undecodable
from schemas.broker.publisher import Publisher
from schemas.codec import Delivery, Job, Rejected, decode_job, encode_reply, error_body
from schemas.contract import DEAD_HEADERS, HEADERS
from schemas.errors import ErrorCode
from schemas.settings import ConfigError, ModelSettings, Settings
from schemas.topology import plan
from workers.amqp import dead_letter_message, minimal_dead_letter, reply_message
from workers.attempts import Dispatcher, Failed, Served
from workers.events import JobDone, ObservedBudget, Spent
from workers.preflight import preflight
from workers.routing import EndpointSpec, Router, RoutingConfig, disposition
from workers.routing.admission import Admission, ModelLimits
from workers.routing.pricing import estimate_usd, prompt_tokens_bound
from workers.routing.spend import NULL_HOLD, Hold
from workers.telemetry import Telemetry
from workers.upstream import Target, Upstream, make_upstream

__all__ = ["Worker", "WorkerStats"]

log = logging.getLogger("llmq.worker")

_RECENT_REPLIES = 10_000
_TENANT = frozenset({HEADERS.TENANT})


@dataclass(slots=True)
class WorkerStats:
    """Counters since start; ``repr`` is the worker's health line."""

    ok: int = 0
    errors: int = 0
    dead_letters: int = 0
    requeued: int = 0
    duplicates: int = 0
    reconnects: int = 0
    in_flight: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Outcome:
    job_id: str | None
    reply: bytes
    code: ErrorCode | None = None
    message: str = ""
    attempts: int = 0
    job: Job | None = None
    routing: dict[str, Any] | None = None
    duplicate: bool = False
    reply_to: str | None = None
    """Where the reply may go: the job's ``reply_to`` once admitted, else None."""


def worst_prices(settings: Settings) -> dict[str, tuple[float, float]]:
    """Per canonical model, the highest (input, output) USD per million tokens among
    the endpoints that may serve it, fallbacks included: what a hard cap reserves."""
    prices: dict[str, tuple[float, float]] = {}
    for endpoint in settings.endpoints:
        for model in endpoint.models:
            pin, pout = endpoint.price(model)
            old = prices.get(model, (0.0, 0.0))
            prices[model] = (max(old[0], pin), max(old[1], pout))
    worst = dict(prices)
    for model, spec in settings.models.items():
        for fallback in spec.fallbacks:
            a, b = worst.get(model, (0.0, 0.0)), prices.get(fallback, (0.0, 0.0))
            worst[model] = (max(a[0], b[0]), max(a[1], b[1]))
    return worst


def admission(settings: Settings) -> Admission:
    """The worker's intake rules, from its settings."""
    topo = settings.topology
    tenancy = settings.tenancy
    return Admission(
        reply_queues=settings.worker.reply_queues,
        own_queues=(topo.dead_queue, *(topo.queue_name(c) for c in topo.classes)),
        own_prefixes=(topo.queue_prefix, f"{topo.state_exchange}."),
        users=tenancy.users,
        trust_header_from=tenancy.trust_header_from,
        default_tenant=tenancy.default,
        limits={
            name: ModelLimits(m.max_output_tokens, m.max_n)
            for name in settings.served_models()
            for m in [settings.models.get(name) or ModelSettings()]
        },
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
        self._endpoints = {e.name: e for e in settings.endpoints}
        w = settings.worker
        config = routing or RoutingConfig(
            max_attempts=w.max_attempts,
            budget_ratio=w.retry_budget_ratio,
            budget_min_per_s=w.retry_budget_min_per_s,
            deadline_margin_s=w.deadline_margin_ms / 1000,
            eject_base_s=w.eject_base_s,
        )
        self.router = Router(
            [EndpointSpec.from_settings(e) for e in settings.endpoints],
            settings.models,
            config,
            rand=random.random,
        )
        budget = ObservedBudget(config.budget_ratio, config.budget_min_per_s, config.budget_ttl_s)
        self.budget = budget
        self.telemetry = Telemetry(
            settings,
            name=self.name,
            router=self.router,
            retry_budget=budget,
            status=self.status,
        )
        budget.hook = self.telemetry.hook
        self._defaults = {k: c.default_sla_ms for k, c in settings.topology.classes.items()}
        self.admission = admission(settings)
        self._worst_price = worst_prices(settings)
        self._hedge = {k: c.hedge for k, c in settings.topology.classes.items()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._recent: OrderedDict[tuple[str, int, bytes], bytes] = OrderedDict()
        self._inflight: dict[tuple[str, int, bytes], asyncio.Future[_Outcome]] = {}
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._consume_conn: AbstractRobustConnection | None = None
        self._publish_conn: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._dispatcher: Dispatcher | None = None
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
        url = self.settings.broker.url.get_secret_value()
        hb = self.settings.broker.heartbeat_s
        self._publish_conn = await connect(url, name=f"llmq-worker-pub {self.name}", heartbeat_s=hb)
        self._consume_conn = await connect(url, name=f"llmq-worker {self.name}", heartbeat_s=hb)
        self._consume_conn.reconnect_callbacks.add(self._reconnected)
        if self._declare:
            from schemas.broker.topology import apply_topology

            await apply_topology(self._publish_conn, plan(self.settings.topology))
        self._publisher = await Publisher.open(self._publish_conn)
        upstream = self._upstream or make_upstream(self.settings.worker.http_transport)
        self._upstream = upstream
        self._dispatcher = Dispatcher(
            router=self.router,
            budget=self.budget,
            upstream=upstream,
            targets={name: Target.from_settings(e) for name, e in self._endpoints.items()},
            max_attempts=self.router.config.max_attempts,
            margin_s=self.router.config.deadline_margin_s,
            clock=time.monotonic,
            rand=random.random,
            hook=self.telemetry.hook,
        )
        await self.telemetry.start(self._publish_conn, self._consume_conn, ready=self._ready)
        topo = self.settings.topology
        for sla_class in sorted(topo.classes):
            # One channel per queue: a channel error requeues only that queue's jobs.
            channel = await self._consume_conn.channel()
            await channel.set_qos(prefetch_count=self.settings.worker.concurrency)
            queue = await channel.get_queue(topo.queue_name(sla_class), ensure=True)
            tag = await queue.consume(self._on_message, no_ack=False)
            self._consumers.append((queue, tag))
        log.info(
            "worker %s serving %s via %s",
            self.name,
            ", ".join(f"{e.name}[{','.join(sorted(e.models))}]" for e in self.settings.endpoints),
            ", ".join(topo.queue_name(c) for c in sorted(topo.classes)),
        )

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
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.telemetry.stop()
        for conn in (self._consume_conn, self._publish_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        if self._upstream is not None:
            await self._upstream.aclose()
        log.info("worker %s stopped: %r", self.name, self)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # A task of our own, not the consumer's (aiormq cancels that one when
        # the consuming channel closes): a job in flight outlives a lost
        # connection, so its redelivery joins it instead of paying the upstream twice.
        task = asyncio.create_task(self._process(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process(self, message: AbstractIncomingMessage) -> None:
        self.stats.in_flight += 1
        try:
            outcome = await self._serve(message)
            await self._settle(message, outcome)
        except asyncio.CancelledError:
            # Shutdown or lost connection: give the job back, unanswered.
            await self._requeue(message)
            raise
        except BrokerFailure as exc:
            log.warning("job %s not settled (%s); requeueing", message.message_id, exc)
            await self._requeue(message)
        except Exception:
            log.exception("job %s: unexpected error", message.message_id)
            await self._crashed(message)
        finally:
            self.stats.in_flight -= 1

    async def _serve(self, message: AbstractIncomingMessage) -> _Outcome:
        unreadable = undecodable(message.headers)
        if unreadable is not None:
            # Its properties could not be decoded (schemas/broker/frames.py): no id and
            # no reply_to to trust, so it is only dead-lettered, raw bytes kept.
            return self._failure(
                None,
                ErrorCode.INVALID_REQUEST,
                f"AMQP properties could not be decoded: {unreadable}",
                None,
                0,
            )
        now_ms = int(time.time() * 1000)
        ts = message.timestamp
        decoded = decode_job(
            Delivery(
                body=message.body,
                routing_key=message.routing_key or "",
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers=message.headers or {},
                timestamp_ms=int(ts.timestamp() * 1000) if ts is not None else None,
                user_id=message.user_id,
            ),
            now_ms=now_ms,
            default_sla_ms=self._defaults,
            max_body_bytes=self.settings.worker.max_body_bytes,
            max_sla_ms=self.settings.worker.max_sla_ms,
        )
        allowed = self.admission.reply_allowed
        if isinstance(decoded, Rejected):
            reply_to = decoded.reply_to if decoded.reply_to and allowed(decoded.reply_to) else None
            return self._failure(
                decoded.job_id, decoded.code, decoded.message, None, 0, None, reply_to
            )
        job = decoded
        if job.reply_to is None:
            # Nobody could read the answer: don't pay an upstream for it.
            return self._failure(
                job.job_id,
                ErrorCode.INVALID_REQUEST,
                "reply_to is missing: the result would have nowhere to go",
                None,
                0,
            )
        if not allowed(job.reply_to):
            # Replying there would write, on the producer's behalf, where it may not.
            return self._failure(
                job.job_id,
                ErrorCode.INVALID_REQUEST,
                f"reply_to {job.reply_to[:100]!r} is not a reply queue"
                " (worker.reply_queues lists the allowed names)",
                None,
                0,
            )
        job = replace(job, tenant=self.admission.tenant(job.user_id, job.tenant))
        # A cached or running answer is shared only with the same request: same
        # body, reply queue, broker user and tenant. Another request that reuses
        # a known job id runs on its own and never sees the first one's answer.
        key = (job.job_id, job.replay_count, _fingerprint(message.body, job))
        cached = self._recent.get(key)
        if cached is not None:
            self.stats.duplicates += 1
            return _Outcome(job.job_id, cached, job=job, duplicate=True, reply_to=job.reply_to)
        original = self._inflight.get(key)
        if original is not None:
            # A redelivery (lost ack, reconnect) of a job this worker is still
            # serving: share its outcome instead of paying the upstream twice.
            self.stats.duplicates += 1
            await asyncio.wait({original})
            if not original.cancelled() and original.exception() is None:
                return replace(original.result(), duplicate=True)
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            outcome = await (
                self._route(job, now_ms)
                if not self.telemetry.tracer.enabled
                else self._traced(job, now_ms)
            )
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
        if outcome.code is None:
            self._remember(key, outcome.reply)
        future.set_result(outcome)
        return outcome

    async def _traced(self, job: Job, now_ms: int) -> _Outcome:
        """``_route`` inside an OpenTelemetry span (only when tracing is configured)."""
        span = self.telemetry.tracer.start(job)
        outcome: _Outcome | None = None
        try:
            outcome = await self._route(replace(job, traceparent=span.traceparent), now_ms)
            return outcome
        finally:
            if outcome is None:
                span.end(code="cancelled", model=None, endpoint=None, attempts=0)
            else:
                routing = outcome.routing or {}
                span.end(
                    code=None if outcome.code is None else outcome.code.value,
                    model=routing.get("model"),
                    endpoint=routing.get("endpoint"),
                    attempts=outcome.attempts,
                )

    async def _route(self, job: Job, now_ms: int) -> _Outcome:
        routing: dict[str, Any] = {"queue_ms": max(0, now_ms - job.published_ms)}
        if now_ms >= job.deadline_ms:
            return self._failure(
                job.job_id,
                ErrorCode.DEADLINE_EXCEEDED,
                "deadline passed while queued",
                routing,
                0,
                job,
            )
        model = self.router.resolve(job.model)
        if model is None:
            return self._failure(
                job.job_id,
                ErrorCode.UNKNOWN_MODEL,
                f"no endpoint serves model {job.model[:100]!r}",
                routing,
                0,
                job,
            )
        routing["model"] = model
        too_much = self.admission.limit(model, job.output_cap, job.n)
        if too_much is not None:
            return self._failure(job.job_id, ErrorCode.INVALID_REQUEST, too_much, routing, 0, job)
        if job.output_cap is None:
            cap = self.admission.output_cap(model, None)
            if cap is not None:  # the model's limit holds for jobs that did not say
                job = replace(job, body={**job.body, "max_completion_tokens": cap}, output_cap=cap)
        budgets = self.telemetry.budgets
        # A hard cap holds under concurrency: the job's worst case is reserved
        # before any call, and this is the hold's one owner (settled or released).
        hold = budgets.reserve(model, job.tenant, self._worst_case_usd(job, model))
        if isinstance(hold, str):
            return self._failure(job.job_id, ErrorCode.OVER_BUDGET, hold, routing, 0, job)
        try:
            assert self._dispatcher is not None
            mono = time.monotonic()
            deadline = mono + (job.deadline_ms - now_ms) / 1000
            result = await self._dispatcher.run(
                job, model, deadline=deadline, hedge=self._hedge.get(job.sla_class, False)
            )
            routing["total_ms"] = round((time.time() * 1000) - job.published_ms, 3)
            if isinstance(result, Failed):
                routing.update(
                    model=result.model or model,
                    endpoint=result.endpoint,
                    attempts=result.attempts,
                    hedged=result.hedged,
                )
                return self._failure(
                    job.job_id, result.code, result.message, routing, result.attempts, job
                )
            return self._success(job, result, routing, hold)
        finally:
            budgets.release(hold)  # a no-op once settled

    def _worst_case_usd(self, job: Job, model: str) -> float:
        """What the job can cost at most: its body as prompt, ``n`` full completions,
        at the dearest endpoint of the model or its fallbacks."""
        if not self.telemetry.budgets.enabled:
            return 0.0
        price_in, price_out = self._worst_price.get(model, (0.0, 0.0))
        cap = job.output_cap or self.router.config.default_max_tokens
        return estimate_usd(prompt_tokens_bound(job.body_bytes), cap, price_in, price_out, job.n)

    def _success(
        self, job: Job, served: Served, routing: dict[str, Any], hold: Hold = NULL_HOLD
    ) -> _Outcome:
        usage_in, usage_out = served.reply.prompt_tokens, served.reply.completion_tokens
        cost = None
        if usage_in is not None and usage_out is not None:
            price_in, price_out = self._endpoints[served.endpoint].price(served.model)
            cost = round((usage_in * price_in + usage_out * price_out) / 1e6, 8)
        # Paid now, whatever happens to the reply: budgets and cost count it here.
        self.telemetry.budgets.settle(hold, cost, model=served.model)
        self.telemetry.hook(
            Spent(served.model, served.endpoint, job.tenant, usage_in, usage_out, cost)
        )
        routing.update(
            model=served.model,
            endpoint=served.endpoint,
            attempts=served.attempts,
            hedged=served.hedged,
            upstream_ms=round(served.upstream_ms, 3),
            prompt_tokens=usage_in,
            completion_tokens=usage_out,
            cost_usd=cost,
        )
        body = encode_reply(job.job_id, response=served.reply.body, routing=routing)
        return _Outcome(
            job.job_id,
            body,
            attempts=served.attempts,
            job=job,
            routing=routing,
            reply_to=job.reply_to,
        )

    def _failure(
        self,
        job_id: str | None,
        code: ErrorCode,
        message: str,
        routing: dict[str, Any] | None,
        attempts: int,
        job: Job | None = None,
        reply_to: str | None = None,
    ) -> _Outcome:
        body = encode_reply(job_id, error=error_body(code, message), routing=routing)
        to = job.reply_to if job is not None else reply_to
        return _Outcome(job_id, body, code, message, attempts, job, routing, reply_to=to)

    def _remember(self, key: tuple[str, int, bytes], body: bytes) -> None:
        # A copy: orjson's result keeps a ~4 KB allocation whatever its length,
        # which would make this cache ~8x larger than its contents.
        self._recent[key] = bytes(memoryview(body))
        if len(self._recent) > _RECENT_REPLIES:
            self._recent.popitem(last=False)

    async def _settle(self, message: AbstractIncomingMessage, outcome: _Outcome) -> None:
        """Carry out the core's disposition: reply, dead letter, then ack, each confirmed."""
        assert self._publisher is not None
        plan = disposition(outcome.code, has_reply_to=outcome.reply_to is not None)
        extra: dict[str, Any] = {}
        undelivered: bytes | None = None
        job = outcome.job
        if plan.reply and outcome.reply_to:
            reply = reply_message(
                outcome.reply,
                correlation_id=message.correlation_id or message.message_id,
                job_id=outcome.job_id,
                traceparent=None if job is None else job.traceparent,
            )
            try:
                await self._publisher.publish(
                    reply,
                    exchange="",
                    routing_key=outcome.reply_to,
                )
            except (Unroutable, Refused) as exc:
                # The caller's queue is gone or full: keep the answer in the dead
                # letter rather than requeue the job into the same wall.
                plan = disposition(outcome.code, has_reply_to=True, reply_unroutable=True)
                why = "does not exist" if isinstance(exc, Unroutable) else "refused it (full)"
                extra = {DEAD_HEADERS.REPLY_ERROR: f"reply_to queue {why}"}
                undelivered = outcome.reply
        if plan.dead_letter:
            assert plan.code is not None
            await self._dead_letter(
                message,
                plan.code,
                outcome.message or "the reply could not be delivered",
                outcome.attempts,
                extra,
                undelivered,
                job,
            )
        try:
            await message.ack()
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as exc:
            # The channel died after the reply was confirmed: the broker will
            # redeliver the job and the caller may see the reply twice.
            raise BrokerFailure(f"ack lost ({type(exc).__name__})") from None
        if outcome.code is None:
            self.stats.ok += 1
        else:
            self.stats.errors += 1
            code = outcome.code.value
            self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
        routing = outcome.routing
        self.telemetry.hook(
            JobDone(
                job_id=outcome.job_id,
                sla_class=message.routing_key or "",
                code=plan.code if plan.dead_letter else outcome.code,
                dead_lettered=plan.dead_letter,
                model=None if routing is None else routing.get("model"),
                endpoint=None if routing is None else routing.get("endpoint"),
                tenant=None if job is None else job.tenant,
                attempts=outcome.attempts,
                queue_s=_seconds(routing, "queue_ms"),
                total_s=_seconds(routing, "total_ms"),
                duplicate=outcome.duplicate,
            )
        )

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        code: ErrorCode,
        error: str,
        attempts: int,
        extra: dict[str, Any],
        reply: bytes | None = None,
        job: Job | None = None,
    ) -> None:
        """Publish the dead letter; if the broker will not take it, a minimal one.

        The rule that keeps this from looping: the full copy (bounded headers),
        then once the copy without the job's own headers and the reply; if that
        fails too, :class:`BrokerFailure` requeues the job, and its delivery
        limit ends it in the broker's own dead-lettering.
        """
        publisher = self._publisher
        assert publisher is not None
        headers = {
            DEAD_HEADERS.ERROR_CODE: code.value,
            DEAD_HEADERS.ERROR: error[:1000],
            DEAD_HEADERS.ATTEMPTS: attempts,
            DEAD_HEADERS.FAILED_AT: int(time.time() * 1000),
            DEAD_HEADERS.WORKER: self.name[:255],
            DEAD_HEADERS.SLA_CLASS: (message.routing_key or "")[:255],
            **extra,
        }
        omit: frozenset[str] = frozenset()
        if job is not None:
            # The tenant the job was billed to, not the one it claimed: a replay by
            # a trusted operator then bills the same tenant again.
            if job.tenant is None:
                omit = _TENANT
            else:
                headers[HEADERS.TENANT] = job.tenant
        exchange = self.settings.topology.dead_exchange
        key = (message.routing_key or "")[:255]
        try:
            letter = dead_letter_message(
                message, headers, reply=reply, frame_max=publisher.frame_max, omit=omit
            )
            await publisher.publish(
                letter,
                exchange=exchange,
                routing_key=key,
            )
        except BrokerFailure as exc:
            log.warning(
                "job %s: dead letter refused (%s); sending a minimal one", message.message_id, exc
            )
            await publisher.publish(
                minimal_dead_letter(message, headers), exchange=exchange, routing_key=key
            )
        self.stats.dead_letters += 1

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        self.stats.requeued += 1
        with contextlib.suppress(Exception):
            await message.nack(requeue=True)

    async def _crashed(self, message: AbstractIncomingMessage) -> None:
        """A bug hit this job: requeue it, or on its last permitted delivery end it here.

        The broker dead-letters a job after ``delivery-limit`` redeliveries, but
        sends no reply; answering on the last delivery keeps callers from waiting.
        """
        count = (message.headers or {}).get("x-delivery-count", 0)
        limit = self.settings.topology.delivery_limit
        if isinstance(count, int) and count >= limit:
            to = message.reply_to
            outcome = self._failure(
                message.message_id,
                ErrorCode.INTERNAL_ERROR,
                f"the worker failed on this job {count + 1} times",
                None,
                0,
                reply_to=to if to and self.admission.reply_allowed(to) else None,
            )
            with contextlib.suppress(Exception):
                await self._settle(message, outcome)
                return
        await self._requeue(message)

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
            "state_shared": self.telemetry.sharing,
        }


def _fingerprint(body: bytes, job: Job) -> bytes:
    """What makes two deliveries under one job id the same request."""
    digest = hashlib.blake2b(body, digest_size=16)
    for part in (job.reply_to, job.user_id, job.tenant, job.model, job.sla_class):
        digest.update(b"\x00" + (part or "").encode("utf-8", "surrogatepass"))
    return digest.digest()


def _seconds(routing: dict[str, Any] | None, key: str) -> float | None:
    value = None if routing is None else routing.get(key)
    return None if value is None else value / 1000
