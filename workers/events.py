"""Instrumentation events: what happened, as frozen data, handed to hooks.

The worker and the dispatcher do not call Prometheus or the logger here and
there; at a few points they build one small event and hand it to their
:class:`Hook`. Metrics (``workers.metrics``), the log lines, the state
gossip and any future exporter are hooks, so the hot path knows nothing
about them and a test can record the events with a list.

Events, one allocation each:

* :class:`AttemptDone`: an upstream call ended (ok, a failure kind, cancelled)
* :class:`Retried` / :class:`Hedged`: a second attempt started
* :class:`RETRY_BUDGET_EXHAUSTED`: the retry budget refused a retry or a hedge
* :class:`Spent`: an upstream answered with usage: tokens and USD
* :class:`JobDone`: a delivery was settled (replied, dead-lettered, acked)
* :class:`SpendAlert`: a monthly budget crossed an alert threshold
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from schemas.errors import ErrorCode
from workers.routing import RetryBudget

__all__ = [
    "NOOP",
    "RETRY_BUDGET_EXHAUSTED",
    "AttemptDone",
    "Event",
    "Hedged",
    "Hook",
    "Hooks",
    "JobDone",
    "ObservedRetryBudget",
    "Retried",
    "RetryBudgetExhausted",
    "SpendAlert",
    "Spent",
]


@dataclass(frozen=True, slots=True)
class AttemptDone:
    """One upstream call ended."""

    endpoint: str
    model: str
    outcome: str
    """``ok``, a FailureKind value (``server_error``, ``timeout``, …) or ``cancelled``."""
    seconds: float


@dataclass(frozen=True, slots=True)
class Retried:
    """A retry started at ``endpoint`` after a failure of ``after`` (a FailureKind value)."""

    endpoint: str
    after: str


@dataclass(frozen=True, slots=True)
class Hedged:
    """A hedge request started at ``endpoint``."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class RetryBudgetExhausted:
    """The retry budget refused a retry or a hedge."""


RETRY_BUDGET_EXHAUSTED = RetryBudgetExhausted()
"""The one instance: refusing costs no allocation."""


@dataclass(frozen=True, slots=True)
class Spent:
    """An upstream answered: what it cost. Counted when paid, whatever the settling."""

    model: str
    endpoint: str
    tenant: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class JobDone:
    """A delivery was settled: its reply and dead letter confirmed, then acked."""

    job_id: str | None
    sla_class: str
    code: ErrorCode | None
    """None for an ok reply."""
    dead_lettered: bool
    model: str | None
    endpoint: str | None
    tenant: str | None
    attempts: int
    queue_s: float | None
    """Publish to pick-up; None when unknown (a rejected or duplicate delivery)."""
    total_s: float | None
    """Publish to reply; None when the job never reached an upstream decision."""
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class SpendAlert:
    """Spend this month crossed ``threshold`` of a budget (once per threshold and month)."""

    scope: str
    """``model`` or ``tenant``."""
    name: str
    threshold: float
    spent_usd: float
    limit_usd: float
    month: str


Event = AttemptDone | Retried | Hedged | RetryBudgetExhausted | Spent | JobDone | SpendAlert


class Hook(Protocol):
    """Receives every event; ignores the kinds it does not care about. Must not raise."""

    def __call__(self, event: Event) -> None: ...


class _Noop:
    def __call__(self, event: Event) -> None:
        pass


NOOP: Hook = _Noop()


class Hooks:
    """Several hooks as one, called in order."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: Iterable[Hook]) -> None:
        self._hooks = tuple(hooks)

    def __call__(self, event: Event) -> None:
        for hook in self._hooks:
            hook(event)


class ObservedRetryBudget(RetryBudget):
    """A :class:`RetryBudget` that reports each refusal to a hook."""

    __slots__ = ("hook",)

    def __init__(
        self, ratio: float, min_per_s: float, ttl_s: float = 10.0, *, batch_keep: float = 0.5
    ) -> None:
        super().__init__(ratio, min_per_s, ttl_s, batch_keep=batch_keep)
        self.hook: Hook = NOOP

    def try_spend(self, now: float, *, batch: bool = False) -> bool:
        if super().try_spend(now, batch=batch):
            return True
        self.hook(RETRY_BUDGET_EXHAUSTED)
        return False
