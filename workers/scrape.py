"""Series read from the worker's live state at scrape time, and the loop monitor.

Nothing here is on the hot path: each scrape reads the router's snapshot,
the worker's counters, the retry budget's balance and the spend limits
through cheap synchronous callables (:class:`Sources`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from workers.routing import EndpointStatus

__all__ = ["CIRCUIT_STATES", "LoopMonitor", "Sources", "register_state"]

CIRCUIT_STATES = ("closed", "cooldown", "half_open", "open", "unusable")
"""The values of ``EndpointStatus.state``, each a series of ``llmq_endpoint_circuit_state``."""


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


class _StateCollector:
    """Series read from the worker's live state at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self._sources = sources

    def describe(self) -> Iterable[Metric]:
        return []  # collect() reads live state; don't run it at registration

    def collect(self) -> Iterable[Metric]:
        yield from _endpoint_series(self._sources.endpoints())
        yield from _worker_series(self._sources)
        yield from _spend_series(self._sources.spend_limits())


def _endpoint_series(statuses: list[EndpointStatus]) -> Iterable[Metric]:
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


def _worker_series(src: Sources) -> Iterable[Metric]:
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


def _spend_series(limits: list[dict[str, Any]]) -> Iterable[Metric]:
    spent = GaugeMetricFamily(
        "llmq_budget_spent_usd",
        "The fleet's spend this month as this worker knows it (shared over the broker).",
        labels=["scope", "name"],
    )
    limit = GaugeMetricFamily("llmq_budget_limit_usd", "Monthly budget.", labels=["scope", "name"])
    for b in limits:
        spent.add_metric([b["scope"], b["name"]], b["spent_usd"])
        limit.add_metric([b["scope"], b["name"]], b["limit_usd"])
    yield from (spent, limit)


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
