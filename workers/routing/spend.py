"""Monthly spend against budgets, shared by every worker without double counting.

Each budget's spend is a grow-only counter (a G-counter CRDT): every worker
(an *origin*, one per process start) adds only to its own entry; the entries
of the others arrive by gossip and merge by ``max``. The fleet's spend is the
sum over origins, so a message heard twice, heard late, or relayed by a third
worker never counts twice, and N replicas never multiply it. A worker that
starts late (or restarts, as a new origin) learns the month so far from any
peer's full payload, or from the snapshots kept in the broker
(:meth:`SpendLedger.snapshot`, ``workers/spend_store.py``): a snapshot merges
like a payload, so reading one twice, or several that overlap, counts once.

Alerts fire once per threshold per month: the highest threshold alerted for a
budget travels with the spend and merges by ``max`` too, so a peer that hears
of an alert does not repeat it. Two workers crossing the same threshold
within one gossip interval may both alert.

Hard caps hold under concurrency by **reservation**: before a call the
worker reserves the job's worst-case cost (:meth:`SpendLedger.reserve`), and
a hard-capped budget refuses it when the fleet's known spend + this worker's
reservations in flight + the estimate would pass the limit; after the call
the hold is settled at the actual cost (:meth:`SpendLedger.settle`) or
released (:meth:`SpendLedger.release`). Reservations are this worker's own:
they are not gossiped. So, if every job costs at most its estimate, the
month's spend on a budget ends at most

    limit + Σ over the *other* workers j of (R_j + G_j)

where, at the moment of the fleet's last grant under that budget, R_j is
worker j's reservations in flight and G_j the spend of j not yet heard by the
granting worker (gossip lag: about one state interval's spend, or, for a
worker that has not yet heard j, what j spent since its last snapshot read
from the broker). R_j is at most
j's concurrent jobs × the largest estimate, and never more than the limit.
One worker alone never passes the limit; W workers pass it by at most
(W − 1) × one worker's in-flight estimate + the gossip lag. Any cost above
its estimate adds to the overshoot one for one.

Reservations survive a change of month: a hold made in July and settled in
August counts against August's cap while in flight, and its cost is added
to the month it is settled in (spend is counted when the upstream answers).

Pure: the caller passes the month (``"2026-07"``, UTC) and does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NULL_HOLD", "Alert", "Hold", "SpendLedger", "SpendLimit", "limit_key"]

MODEL = "model"
TENANT = "tenant"


def limit_key(scope: str, name: str) -> str:
    """The key a budget's spend travels under: ``model:gpt-4.1``, ``tenant:acme``."""
    return f"{scope}:{name}"


@dataclass(frozen=True, slots=True)
class SpendLimit:
    """A monthly limit for one model (all tenants) or one tenant (all models)."""

    scope: str
    """``model`` or ``tenant``."""
    name: str
    limit_usd: float
    hard_cap: bool = False
    key: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", limit_key(self.scope, self.name))


@dataclass(frozen=True, slots=True)
class Alert:
    """Spend crossed ``threshold`` × the budget's limit this month."""

    budget: SpendLimit
    threshold: float
    spent_usd: float
    month: str


@dataclass(frozen=True, slots=True, eq=False)
class Hold:
    """Money reserved for one job in flight, until it is settled or released.

    Compared (and hashed) by identity: two jobs reserving the same amount hold
    two distinct reservations.
    """

    model: str | None
    tenant: str | None
    amount_usd: float
    keys: tuple[str, ...]
    """The hard-capped budgets reserved against (``model:…``, ``tenant:…``)."""


NULL_HOLD = Hold(None, None, 0.0, ())
"""A hold that reserves and records nothing: settling or releasing it is a no-op."""


class SpendLedger:
    """One worker's view of the fleet's spend this month."""

    __slots__ = (
        "_alerted",
        "_budgets",
        "_by_model",
        "_by_tenant",
        "_counts",
        "_full_wanted",
        "_holds",
        "_reserved",
        "_thresholds",
        "_totals",
        "month",
        "origin",
    )

    def __init__(
        self,
        budgets: Iterable[SpendLimit],
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
        self._holds: set[Hold] = set()
        """Holds in flight; not reset with the month (the calls are still running)."""
        self._reserved: dict[str, list[float]] = {}
        """Spend-limit key → [USD reserved in flight, number of holds]: the count lets the
        sum return to exactly 0 when the last hold goes, whatever the float error."""

    def __repr__(self) -> str:
        return (
            f"<SpendLedger {self.month} origins={len(self._counts)} totals={self._totals}"
            f" holds={len(self._holds)}>"
        )

    def __bool__(self) -> bool:
        """Whether any budget is configured (else there is nothing to track)."""
        return bool(self._budgets)

    @property
    def limits(self) -> tuple[SpendLimit, ...]:
        return tuple(self._budgets.values())

    def spent(self, key: str) -> float:
        """The fleet's spend this month under ``key``, as far as this worker knows."""
        return self._totals.get(key, 0.0)

    def reserved(self, key: str) -> float:
        """USD this worker has reserved under ``key`` for jobs in flight."""
        entry = self._reserved.get(key)
        return 0.0 if entry is None else entry[0]

    @property
    def holds(self) -> int:
        """Holds in flight (neither settled nor released yet)."""
        return len(self._holds)

    def _roll(self, month: str) -> None:
        if month != self.month:
            self.month = month
            self._counts = {}
            self._totals = {}
            self._alerted = {}

    # --- this worker's spend ---------------------------------------------------

    def blocked(self, *, model: str | None, tenant: str | None, month: str) -> SpendLimit | None:
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

    def _capped(self, model: str | None, tenant: str | None) -> list[SpendLimit]:
        found = []
        for budget in (
            self._by_model.get(model) if model is not None else None,
            self._by_tenant.get(tenant) if tenant is not None else None,
        ):
            if budget is not None and budget.hard_cap:
                found.append(budget)
        return found

    def reserve(
        self, *, model: str | None, tenant: str | None, estimate_usd: float, month: str
    ) -> Hold | SpendLimit:
        """Reserve a job's worst-case cost, or the hard-capped budget that refuses it.

        A capped budget refuses when its spend + reservations in flight reach
        its limit, or when adding ``estimate_usd`` would pass it. An estimate
        that is not a finite number is refused by any capped budget (it cannot
        be bounded); a negative one counts as 0. Every hold returned must be
        settled or released exactly once; doing it again is a no-op.
        """
        self._roll(month)
        capped = self._capped(model, tenant)
        finite = math.isfinite(estimate_usd)
        amount = max(0.0, estimate_usd) if finite else 0.0
        for budget in capped:
            committed = self.spent(budget.key) + self.reserved(budget.key)
            if not finite or committed >= budget.limit_usd:
                return budget
            if committed + amount > budget.limit_usd:
                return budget
        hold = Hold(model, tenant, amount, tuple(b.key for b in capped))
        self._holds.add(hold)
        for key in hold.keys:
            entry = self._reserved.setdefault(key, [0.0, 0])
            entry[0] += amount
            entry[1] += 1
        return hold

    def release(self, hold: Hold) -> bool:
        """Drop a hold without cost (no upstream work was done); False if already gone."""
        if hold not in self._holds:
            return False
        self._holds.remove(hold)
        for key in hold.keys:
            entry = self._reserved[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._reserved[key]
            else:
                entry[0] = max(0.0, entry[0] - hold.amount_usd)
        return True

    def settle(
        self, hold: Hold, cost_usd: float, *, month: str, model: str | None = None
    ) -> list[Alert]:
        """The job's calls are over at ``cost_usd``: release the hold, record the cost.

        ``model`` is the model that served the job when it is not the one
        reserved for (a fallback); its spend counts there. A hold settled or
        released before records nothing, so a caller's ``finally`` cannot
        count a job twice. Returns the alerts the cost set off.
        """
        if not self.release(hold):
            return []
        served = hold.model if model is None else model
        return self.record(model=served, tenant=hold.tenant, cost_usd=cost_usd, month=month)

    def record(
        self, *, model: str | None, tenant: str | None, cost_usd: float, month: str
    ) -> list[Alert]:
        """This worker spent ``cost_usd`` on a job; returns the alerts it set off."""
        self._roll(month)
        alerts: list[Alert] = []
        if not 0 < cost_usd < math.inf:  # NaN and inf would poison the totals and gossip
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

    def _check(self, budget: SpendLimit, month: str, alerts: list[Alert]) -> None:
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

    def snapshot(self, *, month: str) -> dict[str, Any]:
        """Every origin's counts and the alert marks, for the broker to keep.

        Like a full :meth:`payload` without its side effect (gossip still owes a
        newcomer its full payload), and without the origins that never spent:
        every worker start is an origin, and most never spend under a budget.
        """
        self._roll(month)
        origins = {o: dict(c) for o, c in self._counts.items() if c}
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

    def view(self) -> list[tuple[SpendLimit, float]]:
        """Every budget and the fleet's spend on it this month."""
        return [(b, self.spent(b.key)) for b in self._budgets.values()]
