"""The worker's Prometheus series (served by :class:`schemas.exposition.MetricsServer`).

Each process builds its own ``CollectorRegistry`` (never the global one), so
two workers in one test process do not share series. Two kinds of series:

* counted from events (:class:`WorkerMetrics` is a :class:`~workers.events.Hook`):
  jobs, attempts, retries, hedges, tokens, cost, budget alerts. Label children
  are looked up once and cached, so an event costs a dict lookup and an add.
* read at scrape time (:class:`_StateCollector`): per-endpoint in-flight,
  capacity, cost score, circuit state, ejections; the worker's counters;
  budget spend. Nothing on the hot path.

docs/observability.md lists every series with its type and labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from schemas.settings import Settings
from workers.events import (
    AttemptDone,
    Event,
    Hedged,
    JobDone,
    Retried,
    RetryBudgetExhausted,
    SpendAlert,
    Spent,
)
from workers.routing import EndpointStatus

__all__ = [
    "CIRCUIT_STATES",
    "LoopMonitor",
    "Sources",
    "WorkerMetrics",
    "configured_tenants",
    "register_state",
]

log = logging.getLogger("llmq.metrics")

# Queue waits range from milliseconds (interactive) to hours (a batch backlog).
QUEUE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400
)  # fmt: skip
# An LLM call takes 50 ms (a cached short answer) to minutes (a long generation).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

CIRCUIT_STATES = ("closed", "cooldown", "half_open", "open", "unusable")
"""The values of ``EndpointStatus.state``, each a series of ``llmq_endpoint_circuit_state``."""

NO_TENANT = "(none)"
OTHER_TENANT = "(other)"
_NONE = "none"


@dataclass(frozen=True, slots=True)
class Sources:
    """What the scrape-time collector reads; each callable is cheap and synchronous."""

    endpoints: Callable[[], list[EndpointStatus]]
    counters: Callable[[], Mapping[str, int]]
    """``in_flight``, ``requeued``, ``duplicates``, ``reconnects``."""
    retry_balance: Callable[[], float]
    spend_limits: Callable[[], list[dict[str, Any]]]
    peers: Callable[[], int]
    loop_lag: Callable[[], float]


class WorkerMetrics:
    """The worker's event-driven series; a :class:`~workers.events.Hook`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_tenants: int = 100,
        configured_tenants: Iterable[str] = (),
    ) -> None:
        self._max_tenants = max_tenants
        self._configured = frozenset(configured_tenants)
        self._tenants: set[str] = set()
        """Tenants not in the configuration, labelled first-come in the slots left."""
        self.jobs = Counter(
            "llmq_jobs",
            "Jobs settled, by outcome (ok, error) and error code (none when ok);"
            " redeliveries answered again are not counted twice.",
            ["outcome", "code"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "llmq_dead_letters",
            "Jobs the worker dead-lettered, by error code.",
            ["code"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "llmq_queue_wait_seconds",
            "Time from publish to a worker taking the job.",
            ["sla_class"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.job_duration = Histogram(
            "llmq_job_duration_seconds",
            "Time from publish to the reply (queue wait included).",
            ["sla_class"],
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.upstream = Histogram(
            "llmq_upstream_duration_seconds",
            "Duration of upstream calls, by endpoint and outcome (ok, a failure kind, cancelled).",
            ["endpoint", "outcome"],
            buckets=UPSTREAM_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "llmq_retries",
            "Retries started, by the endpoint retried on and the failure that caused it.",
            ["endpoint", "after"],
            registry=registry,
        )
        self.hedges = Counter(
            "llmq_hedges",
            "Hedge requests started, by endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.budget_exhausted = Counter(
            "llmq_retry_budget_exhausted",
            "Retries and hedges the retry budget refused.",
            registry=registry,
        )
        self.tokens = Counter(
            "llmq_tokens",
            "Tokens the upstreams reported, by model, endpoint, tenant and kind.",
            ["model", "endpoint", "tenant", "kind"],
            registry=registry,
        )
        self.cost = Counter(
            "llmq_cost_usd",
            "USD spent at the configured prices, by model, endpoint and tenant.",
            ["model", "endpoint", "tenant"],
            registry=registry,
        )
        self.budget_alerts = Counter(
            "llmq_budget_alerts",
            "SpendLimit alerts, once per threshold and month.",
            ["scope", "name", "threshold"],
            registry=registry,
        )
        # Label children, looked up once each.
        self._jobs: dict[str | None, Any] = {}
        self._dead: dict[str, Any] = {}
        self._waits: dict[str, tuple[Any, Any]] = {}
        self._calls: dict[tuple[str, str], Any] = {}
        self._spend: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._retries: dict[tuple[str, str], Any] = {}
        self._hedges: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, AttemptDone):
            key = (event.endpoint, event.outcome)
            child = self._calls.get(key)
            if child is None:
                child = self._calls[key] = self.upstream.labels(*key)
            child.observe(event.seconds)
        elif isinstance(event, JobDone):
            self._job(event)
        elif isinstance(event, Spent):
            self._spent(event)
        elif isinstance(event, Retried):
            rkey = (event.endpoint, event.after)
            child = self._retries.get(rkey)
            if child is None:
                child = self._retries[rkey] = self.retries.labels(*rkey)
            child.inc()
        elif isinstance(event, Hedged):
            child = self._hedges.get(event.endpoint)
            if child is None:
                child = self._hedges[event.endpoint] = self.hedges.labels(event.endpoint)
            child.inc()
        elif isinstance(event, RetryBudgetExhausted):
            self.budget_exhausted.inc()
        elif isinstance(event, SpendAlert):
            self.budget_alerts.labels(event.scope, event.name, f"{event.threshold:g}").inc()

    def _job(self, event: JobDone) -> None:
        code = event.code
        if event.dead_lettered:
            name = code.value if code is not None else _NONE
            dead = self._dead.get(name)
            if dead is None:
                dead = self._dead[name] = self.dead_letters.labels(name)
            dead.inc()
        if event.duplicate:
            return  # a redelivery answered again: the job was counted the first time
        child = self._jobs.get(code)
        if child is None:
            labels = ("ok", _NONE) if code is None else ("error", code.value)
            child = self._jobs[code] = self.jobs.labels(*labels)
        child.inc()
        if event.queue_s is None and event.total_s is None:
            return
        waits = self._waits.get(event.sla_class)
        if waits is None:
            waits = self._waits[event.sla_class] = (
                self.queue_wait.labels(event.sla_class),
                self.job_duration.labels(event.sla_class),
            )
        if event.queue_s is not None:
            waits[0].observe(event.queue_s)
        if event.total_s is not None:
            waits[1].observe(event.total_s)

    def tenant_label(self, tenant: str | None) -> str:
        """The tenant's label value; past ``max_tenants`` distinct ones, ``(other)``.

        Configured tenants always have their own label, so that any producer
        naming junk tenants cannot push them into ``(other)``; the slots left
        of ``max_tenants`` go to other tenants first-come.
        """
        if tenant is None:
            return NO_TENANT
        if tenant in self._configured or tenant in self._tenants:
            return tenant
        if len(self._tenants) + len(self._configured) < self._max_tenants:
            self._tenants.add(tenant)
            return tenant
        return OTHER_TENANT

    def _spent(self, event: Spent) -> None:
        key = (event.model, event.endpoint, self.tenant_label(event.tenant))
        children = self._spend.get(key)
        if children is None:
            children = self._spend[key] = (
                self.tokens.labels(*key, "prompt"),
                self.tokens.labels(*key, "completion"),
                self.cost.labels(*key),
            )
        if event.prompt_tokens:
            children[0].inc(event.prompt_tokens)
        if event.completion_tokens:
            children[1].inc(event.completion_tokens)
        if event.cost_usd:
            children[2].inc(event.cost_usd)


class _StateCollector:
    """Series read from the worker's live state at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def describe(self) -> Iterable[Metric]:
        return []  # collect() reads live state; don't run it at registration

    def collect(self) -> Iterable[Metric]:
        src = self._sources
        statuses = src.endpoints()
        in_flight = GaugeMetricFamily(
            "llmq_endpoint_in_flight", "Requests in flight per endpoint.", labels=["endpoint"]
        )
        capacity = GaugeMetricFamily(
            "llmq_endpoint_capacity",
            "Concurrency limit per endpoint now (max_concurrency, lowered by 429s).",
            labels=["endpoint"],
        )
        score = GaugeMetricFamily(
            "llmq_endpoint_cost_score_seconds",
            "Predicted latency of a job at the endpoint, failures included (the routing"
            " cost before load); absent until the endpoint has answered once.",
            labels=["endpoint"],
        )
        failure = GaugeMetricFamily(
            "llmq_endpoint_failure_rate",
            "Recent failure rate per endpoint (time-decayed).",
            labels=["endpoint"],
        )
        circuit = GaugeMetricFamily(
            "llmq_endpoint_circuit_state",
            "1 for the endpoint's current state (closed, cooldown, half_open, open, unusable).",
            labels=["endpoint", "state"],
        )
        ejections = CounterMetricFamily(
            "llmq_endpoint_ejections",
            "Times this worker ejected the endpoint (outlier detection).",
            labels=["endpoint"],
        )
        for s in statuses:
            in_flight.add_metric([s.name], s.in_flight)
            capacity.add_metric([s.name], s.capacity)
            if s.predicted_s is not None:
                score.add_metric([s.name], s.predicted_s)
            failure.add_metric([s.name], s.failure_rate)
            for state in CIRCUIT_STATES:
                circuit.add_metric([s.name, state], 1.0 if s.state == state else 0.0)
            ejections.add_metric([s.name], s.ejections)
        yield from (in_flight, capacity, score, failure, circuit, ejections)

        counters = src.counters()
        yield GaugeMetricFamily(
            "llmq_jobs_in_flight", "Jobs this worker holds now.", value=counters["in_flight"]
        )
        yield CounterMetricFamily(
            "llmq_jobs_requeued",
            "Deliveries given back to the queue (shutdown, broker trouble, crashes).",
            value=counters["requeued"],
        )
        yield CounterMetricFamily(
            "llmq_jobs_duplicate",
            "Redeliveries answered from a finished or running job instead of the upstream.",
            value=counters["duplicates"],
        )
        yield CounterMetricFamily(
            "llmq_broker_reconnects", "Reconnections to the broker.", value=counters["reconnects"]
        )
        yield GaugeMetricFamily(
            "llmq_retry_budget_balance",
            "Retries the retry budget allows now.",
            value=src.retry_balance(),
        )
        yield GaugeMetricFamily(
            "llmq_state_peers",
            "Other workers heard on the state exchange recently.",
            value=src.peers(),
        )
        yield GaugeMetricFamily(
            "llmq_event_loop_lag_seconds",
            "How late the event loop ran a 0.5 s timer, last check.",
            value=src.loop_lag(),
        )
        spent = GaugeMetricFamily(
            "llmq_budget_spent_usd",
            "The fleet's spend this month as this worker knows it (shared over the broker).",
            labels=["scope", "name"],
        )
        limit = GaugeMetricFamily(
            "llmq_budget_limit_usd", "Monthly budget.", labels=["scope", "name"]
        )
        for b in src.spend_limits():
            spent.add_metric([b["scope"], b["name"]], b["spent_usd"])
            limit.add_metric([b["scope"], b["name"]], b["limit_usd"])
        yield from (spent, limit)


def configured_tenants(settings: Settings) -> frozenset[str]:
    """Tenants the configuration names: budgets, gateway keys, broker users, the default."""
    tenancy = settings.tenancy
    named = {*settings.budgets.tenants, *settings.gateway.tenants, *tenancy.users.values()}
    if tenancy.default is not None:
        named.add(tenancy.default)
    return frozenset(named)


def register_state(registry: CollectorRegistry, sources: Sources) -> None:
    """Add the scrape-time series to ``registry``."""
    registry.register(_StateCollector(sources))


class LoopMonitor:
    """A timer every ``period_s``; how late it fires is the loop's lag."""

    def __init__(self, period_s: float = 0.5) -> None:
        self.period_s = period_s
        self.lag_s = 0.0
        self.last_tick = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.period_s)
            self.lag_s = max(0.0, loop.time() - before - self.period_s)
            self.last_tick = time.monotonic()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
