"""Monthly budgets on the worker: reserve before calling, settle after, alert, gossip.

A job reserves its worst-case cost (:meth:`SpendLimits.reserve`, estimated
with :func:`workers.routing.pricing.estimate_usd`) before any upstream call
and settles the hold at the actual cost (:meth:`SpendLimits.settle`) or
releases it (:meth:`SpendLimits.release`) in a ``finally``; so concurrent
jobs cannot all pass a hard cap that one of them exhausts. The bound on what
the fleet can still overshoot is in :mod:`workers.routing.spend`.
``check``/``spend`` are the older check-before, charge-after pair.

The arithmetic is :class:`workers.routing.spend.SpendLedger` (pure); this
module gives it the clock (the UTC month), turns its alerts into
:class:`~workers.events.SpendAlert` events and exposes the gossip payload.
The fleet's spend is what this worker spent plus what it has heard from the
others over ``topology.state_exchange`` (``workers.state``): eventually
consistent within about a gossip interval. Restarts keep it through the
snapshots in ``topology.spend_stream`` (``workers.spend_store``). See
docs/observability.md, "Budgets".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from schemas.settings import BudgetsSettings
from workers.events import NOOP, Hook, SpendAlert
from workers.routing.spend import NULL_HOLD, Alert, Hold, SpendLedger, SpendLimit

__all__ = ["NULL_HOLD", "Hold", "SpendLimits", "month_of"]


def month_of(epoch_s: float) -> str:
    """The UTC calendar month of a time: ``"2026-07"``."""
    return time.strftime("%Y-%m", time.gmtime(epoch_s))


class SpendLimits:
    """The worker's budgets; does nothing (and costs nothing) when none is configured."""

    def __init__(
        self,
        settings: BudgetsSettings,
        *,
        origin: str,
        hook: Hook = NOOP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        budgets = [
            SpendLimit("model", name, b.monthly_usd, b.hard_cap)
            for name, b in settings.models.items()
        ] + [
            SpendLimit("tenant", name, b.monthly_usd, b.hard_cap)
            for name, b in settings.tenants.items()
        ]
        self.ledger = SpendLedger(budgets, origin=origin, thresholds=settings.thresholds)
        self.enabled = bool(self.ledger)
        self.hook = hook
        self._clock = clock
        self._capped = any(b.hard_cap for b in budgets)

    def __repr__(self) -> str:
        return f"<SpendLimits {self.ledger!r}>"

    def check(self, model: str, tenant: str | None) -> str | None:
        """Why a job may not run (a hard cap is spent), or None."""
        if not self._capped:
            return None
        budget = self.ledger.blocked(model=model, tenant=tenant, month=month_of(self._clock()))
        if budget is None:
            return None
        return (
            f"the monthly budget of {budget.scope} {budget.name!r}"
            f" ({budget.limit_usd:.2f} USD) is spent"
        )

    def reserve(self, model: str, tenant: str | None, estimate_usd: float) -> Hold | str:
        """Reserve a job's worst-case cost; or why it may not run (a hard cap).

        The hold must be settled (:meth:`settle`) or released (:meth:`release`)
        on every path. Without budgets this returns the shared :data:`NULL_HOLD`.
        """
        if not self.enabled:
            return NULL_HOLD
        got = self.ledger.reserve(
            model=model, tenant=tenant, estimate_usd=estimate_usd, month=month_of(self._clock())
        )
        if isinstance(got, Hold):
            return got
        limit = f"the monthly budget of {got.scope} {got.name!r} ({got.limit_usd:.2f} USD)"
        if self.ledger.spent(got.key) >= got.limit_usd:
            return f"{limit} is spent"
        # Neither this spend nor the reservations are the caller's to see: only
        # their own job's worst case, and that the budget cannot take it now.
        return (
            f"{limit} cannot cover this job's worst-case cost ({estimate_usd:.4f} USD)"
            " with what is already spent and reserved"
        )

    def settle(self, hold: Hold, cost_usd: float | None, *, model: str | None = None) -> None:
        """The job's upstream calls are over at ``cost_usd`` (None: not reported).

        Releases the hold and adds the cost to this month's spend, under
        ``model`` when a fallback served the job. Settling or releasing a hold
        a second time does nothing.
        """
        if hold is NULL_HOLD:
            return
        month = month_of(self._clock())
        self._alert(self.ledger.settle(hold, cost_usd or 0.0, month=month, model=model))

    def release(self, hold: Hold) -> None:
        """Drop a hold without cost: the job made no upstream call that may be billed."""
        if hold is not NULL_HOLD:
            self.ledger.release(hold)

    def spend(self, model: str, tenant: str | None, cost_usd: float | None) -> None:
        """An upstream answered at ``cost_usd``: add it to this month's spend."""
        if not self.enabled or not cost_usd:
            return
        month = month_of(self._clock())
        self._alert(self.ledger.record(model=model, tenant=tenant, cost_usd=cost_usd, month=month))

    def payload(self, *, full: bool = False) -> dict[str, Any] | None:
        """This worker's spend for the state message; None without budgets."""
        if not self.enabled:
            return None
        return self.ledger.payload(month=month_of(self._clock()), full=full)

    def snapshot(self) -> dict[str, Any] | None:
        """Every origin's spend this month, for the broker to keep; None without budgets."""
        if not self.enabled:
            return None
        return self.ledger.snapshot(month=month_of(self._clock()))

    def heard(self, payload: Mapping[str, Any]) -> None:
        """Fold in the spend a peer reported."""
        if self.enabled:
            self._alert(self.ledger.merge(payload, month=month_of(self._clock())))

    def _alert(self, alerts: list[Alert]) -> None:
        for a in alerts:
            b = a.budget
            self.hook(SpendAlert(b.scope, b.name, a.threshold, a.spent_usd, b.limit_usd, a.month))

    def view(self) -> list[dict[str, Any]]:
        """Each budget, its limit and the fleet's spend this month, as data."""
        return [
            {
                "scope": b.scope,
                "name": b.name,
                "limit_usd": b.limit_usd,
                "hard_cap": b.hard_cap,
                "spent_usd": round(spent, 6),
            }
            for b, spent in self.ledger.view()
        ]
