"""Monthly spend against budgets, shared by every worker without double counting.

Each budget's spend is a grow-only counter (a G-counter CRDT): every worker
(an *origin*, one per process start) adds only to its own entry; the entries
of the others arrive by gossip and merge by ``max``. The fleet's spend is the
sum over origins, so a message heard twice, heard late, or relayed by a third
worker never counts twice, and N replicas never multiply it. A worker that
starts late (or restarts, as a new origin) learns the month so far from any
peer's full payload.

Alerts fire once per threshold per month: the highest threshold alerted for a
budget travels with the spend and merges by ``max`` too, so a peer that hears
of an alert does not repeat it. Two workers crossing the same threshold
within one gossip interval may both alert.

Pure: the caller passes the month (``"2026-07"``, UTC) and does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Alert", "Budget", "SpendLedger", "budget_key"]

MODEL = "model"
TENANT = "tenant"


def budget_key(scope: str, name: str) -> str:
    """The key a budget's spend travels under: ``model:gpt-4.1``, ``tenant:acme``."""
    return f"{scope}:{name}"


@dataclass(frozen=True, slots=True)
class Budget:
    """A monthly limit for one model (all tenants) or one tenant (all models)."""

    scope: str
    """``model`` or ``tenant``."""
    name: str
    limit_usd: float
    hard_cap: bool = False
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", budget_key(self.scope, self.name))


@dataclass(frozen=True, slots=True)
class Alert:
    """Spend crossed ``threshold`` × the budget's limit this month."""

    budget: Budget
    threshold: float
    spent_usd: float
    month: str


class SpendLedger:
    """One worker's view of the fleet's spend this month."""

    __slots__ = (
        "_alerted",
        "_budgets",
        "_by_model",
        "_by_tenant",
        "_counts",
        "_full_wanted",
        "_thresholds",
        "_totals",
        "month",
        "origin",
    )

    def __init__(
        self,
        budgets: Iterable[Budget],
        *,
        origin: str,
        thresholds: Sequence[float] = (0.5, 0.75, 0.9),
    ) -> None:
        self.origin = origin
        self._budgets = {b.key: b for b in budgets}
        self._by_model = {b.name: b for b in self._budgets.values() if b.scope == MODEL}
        self._by_tenant = {b.name: b for b in self._budgets.values() if b.scope == TENANT}
        self._thresholds = tuple(sorted(thresholds))
        self.month: str | None = None
        self._counts: dict[str, dict[str, float]] = {}
        """origin → budget key → that origin's cumulative USD this month."""
        self._totals: dict[str, float] = {}
        self._alerted: dict[str, float] = {}
        self._full_wanted = False

    def __repr__(self) -> str:
        return f"<SpendLedger {self.month} origins={len(self._counts)} totals={self._totals}>"

    def __bool__(self) -> bool:
        """Whether any budget is configured (else there is nothing to track)."""
        return bool(self._budgets)

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return tuple(self._budgets.values())

    def spent(self, key: str) -> float:
        """The fleet's spend this month under ``key``, as far as this worker knows."""
        return self._totals.get(key, 0.0)

    def _roll(self, month: str) -> None:
        if month != self.month:
            self.month = month
            self._counts = {}
            self._totals = {}
            self._alerted = {}

    # --- this worker's spend ---------------------------------------------------

    def blocked(self, *, model: str | None, tenant: str | None, month: str) -> Budget | None:
        """The hard-capped budget that is spent, for a job of ``model`` and ``tenant``."""
        self._roll(month)
        for budget in (
            self._by_model.get(model) if model is not None else None,
            self._by_tenant.get(tenant) if tenant is not None else None,
        ):
            if budget is None or not budget.hard_cap:
                continue
            if self.spent(budget.key) >= budget.limit_usd:
                return budget
        return None

    def record(
        self, *, model: str | None, tenant: str | None, cost_usd: float, month: str
    ) -> list[Alert]:
        """This worker spent ``cost_usd`` on a job; returns the alerts it set off."""
        self._roll(month)
        alerts: list[Alert] = []
        if cost_usd <= 0:
            return alerts
        for budget in (
            self._by_model.get(model) if model is not None else None,
            self._by_tenant.get(tenant) if tenant is not None else None,
        ):
            if budget is not None:
                own = self._counts.setdefault(self.origin, {})
                own[budget.key] = own.get(budget.key, 0.0) + cost_usd
                self._totals[budget.key] = self.spent(budget.key) + cost_usd
                self._check(budget, month, alerts)
        return alerts

    def _check(self, budget: Budget, month: str, alerts: list[Alert]) -> None:
        spent = self.spent(budget.key)
        done = self._alerted.get(budget.key, 0.0)
        for threshold in self._thresholds:
            if threshold > done and spent >= threshold * budget.limit_usd:
                alerts.append(Alert(budget, threshold, spent, month))
                self._alerted[budget.key] = threshold

    # --- gossip ------------------------------------------------------------------

    def payload(self, *, month: str, full: bool = False) -> dict[str, Any]:
        """What to gossip: this origin's counts, or every origin's when ``full``.

        A full payload is also sent on the first call after hearing an origin
        not seen before (a worker that just started needs the month so far).
        """
        self._roll(month)
        if full or self._full_wanted:
            self._full_wanted = False
            origins = {o: dict(c) for o, c in self._counts.items()}
        else:
            origins = {self.origin: dict(self._counts.get(self.origin, {}))}
        return {"month": month, "origins": origins, "alerted": dict(self._alerted)}

    def merge(self, payload: Mapping[str, Any], *, month: str) -> list[Alert]:
        """Fold in a peer's payload (from :meth:`payload`); returns alerts it set off here.

        Payloads of another month are ignored; malformed parts are skipped.
        """
        self._roll(month)
        alerts: list[Alert] = []
        if payload.get("month") != month:
            return alerts
        alerted = payload.get("alerted")
        if isinstance(alerted, dict):
            for key, threshold in alerted.items():
                if isinstance(threshold, int | float) and threshold > self._alerted.get(key, 0.0):
                    self._alerted[key] = float(threshold)
        origins = payload.get("origins")
        if not isinstance(origins, dict):
            return alerts
        changed: set[str] = set()
        for origin, counts in origins.items():
            if origin == self.origin or not isinstance(counts, dict):
                continue  # our own entry is never older elsewhere than here
            mine = self._counts.get(origin)
            if mine is None:
                mine = self._counts[origin] = {}
                self._full_wanted = True
            for key, value in counts.items():
                if not isinstance(value, int | float):
                    continue
                old = mine.get(key, 0.0)
                if value > old:
                    mine[key] = float(value)
                    self._totals[key] = self.spent(key) + (value - old)
                    changed.add(key)
        for key in sorted(changed):
            budget = self._budgets.get(key)
            if budget is not None:
                self._check(budget, month, alerts)
        return alerts

    def view(self) -> list[tuple[Budget, float]]:
        """Every budget and the fleet's spend on it this month."""
        return [(b, self.spent(b.key)) for b in self._budgets.values()]
