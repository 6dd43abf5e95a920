"""What the worker shows: events, metrics, traces and health, assembled in one place.

The worker hands its events to ``Telemetry.hook`` (log lines, Prometheus
series, the recent-errors window of the state message, spend alerts).
``start`` opens the HTTP endpoint (``/metrics``, ``/healthz``, ``/readyz``),
an optional extra: when the port is taken the worker logs it and keeps
routing jobs. Sharing state with peers is ``workers/gossip.py``'s.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from schemas.exposition import MetricsServer, new_registry
from schemas.settings import Settings
from workers.events import Hook, Hooks
from workers.job_log import LogHook
from workers.metrics import WorkerMetrics, configured_tenants
from workers.routing import RetryBudget, Router
from workers.scrape import LoopMonitor, Sources, register_state
from workers.spend_limits import SpendLimits
from workers.state import StateBook
from workers.tracing import Tracer, make_tracer

__all__ = ["Telemetry"]

log = logging.getLogger("llmq.worker")

_STALE_LOOP_S = 10.0
"""/healthz fails when the loop monitor has not ticked for this long."""

Check = Callable[[], tuple[bool, dict[str, Any]]]


class Telemetry:
    """Metrics, logs, traces and health of one worker."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        router: Router,
        retry_budget: RetryBudget,
        status: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.settings = settings
        self.origin = f"{name}#{uuid.uuid4().hex[:6]}"
        """Unique per process start: budgets count each start's spend once."""
        self.router = router
        self._status = status
        self.registry = new_registry()
        self.metrics = WorkerMetrics(
            self.registry,
            max_tenants=settings.metrics.max_tenants,
            configured_tenants=configured_tenants(settings),
        )
        self.book = StateBook(origin=self.origin, worker=name)
        self.hook: Hook = Hooks([LogHook(log), self.metrics, self.book])
        self.spend_limits = SpendLimits(settings.budgets, origin=self.origin, hook=self.hook)
        self.tracer: Tracer = make_tracer()
        self.loop = LoopMonitor()
        self.peers: Callable[[], int] = lambda: 0
        """Live peers (the worker points this at its gossip)."""
        register_state(
            self.registry,
            Sources(
                endpoints=lambda: router.snapshot(now=time.monotonic()),
                counters=status,
                retry_balance=lambda: retry_budget.balance(time.monotonic()),
                spend_limits=self.spend_limits.view,
                peers=lambda: self.peers(),
                loop_lag=lambda: self.loop.lag_s,
            ),
        )
        self.server: MetricsServer | None = None
        self.port: int | None = None

    async def start(self, *, ready: Check) -> None:
        """Open the HTTP endpoint."""
        self.loop.start()
        cfg = self.settings.metrics
        if cfg.enabled:
            server = MetricsServer(self.registry, health=self.health, ready=ready)
            try:
                self.port = await server.start(cfg.host, cfg.port)
                self.server = server
                log.info("metrics on http://%s:%d/metrics", cfg.host, self.port)
            except OSError as exc:
                log.error(
                    "metrics: cannot listen on %s:%d (%s); serving jobs without /metrics",
                    cfg.host,
                    cfg.port,
                    exc.strerror or exc,
                )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        await self.loop.stop()
        self.tracer.shutdown()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive: the event loop runs its timers (this answer itself needs the loop)."""
        stale = time.monotonic() - self.loop.last_tick
        ok = self.loop.alive and stale < _STALE_LOOP_S
        return ok, {
            "status": "ok" if ok else "event loop stalled",
            "loop_lag_s": round(self.loop.lag_s, 4),
        }
