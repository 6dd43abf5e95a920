"""The worker's event-driven Prometheus series (served by ``schemas.exposition``).

Each process builds its own ``CollectorRegistry`` (never the global one), so
two workers in one test process do not share series. Two kinds of series:

* counted from events (:class:`WorkerMetrics` is a :class:`~workers.events.Hook`):
  jobs, attempts, retries, hedges, tokens, cost, budget alerts. Label children
  are looked up once and cached, so an event costs a dict lookup and an add.
* read at scrape time (``workers/scrape.py``): per-endpoint in-flight,
  capacity, cost score, circuit state, ejections; the worker's counters;
  budget spend. Nothing on the hot path.

docs/observability.md lists every series with its type and labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

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

__all__ = [
    "WorkerMetrics",
    "configured_tenants",
]

log = logging.getLogger("llmq.metrics")

# Queue waits range from milliseconds (interactive) to hours (a batch backlog).
QUEUE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400
)  # fmt: skip
# An LLM call takes 50 ms (a cached short answer) to minutes (a long generation).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)

NO_TENANT = "(none)"
OTHER_TENANT = "(other)"
_NONE = "none"


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
        self._define_calls(registry)
        self._define_spend(registry)
        # Label children, looked up once each.
        self._jobs: dict[str | None, Any] = {}
        self._dead: dict[str, Any] = {}
        self._waits: dict[str, tuple[Any, Any]] = {}
        self._calls: dict[tuple[str, str], Any] = {}
        self._spend: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._retries: dict[tuple[str, str], Any] = {}
        self._hedges: dict[str, Any] = {}

    def _define_calls(self, registry: CollectorRegistry) -> None:
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

    def _define_spend(self, registry: CollectorRegistry) -> None:
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
            "Budget alerts, once per threshold and month.",
            ["scope", "name", "threshold"],
            registry=registry,
        )

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


def configured_tenants(settings: Settings) -> frozenset[str]:
    """Tenants the configuration names: budgets, gateway keys, broker users, the default."""
    tenancy = settings.tenancy
    named = {*settings.budgets.tenants, *settings.gateway.tenants, *tenancy.users.values()}
    if tenancy.default is not None:
        named.add(tenancy.default)
    return frozenset(named)
