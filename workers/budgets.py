"""Monthly budgets on the worker: check before calling, record after, alert, gossip.

The arithmetic is :class:`workers.routing.spend.SpendLedger` (pure); this
module gives it the clock (the UTC month), turns its alerts into
:class:`~workers.events.BudgetAlert` events and exposes the gossip payload.
The fleet's spend is what this worker spent plus what it has heard from the
others over ``topology.state_exchange`` (``workers.state``): eventually
consistent within about a gossip interval, kept in memory only. See
docs/observability.md, "Budgets".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from schemas.settings import BudgetsSettings
from workers.events import NOOP, BudgetAlert, Hook
from workers.routing.spend import Alert, Budget, SpendLedger

__all__ = ["BudgetKeeper", "month_of"]


def month_of(epoch_s: float) -> str:
    """The UTC calendar month of a time: ``"2026-07"``."""
    return time.strftime("%Y-%m", time.gmtime(epoch_s))


class BudgetKeeper:
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
            Budget("model", name, b.monthly_usd, b.hard_cap) for name, b in settings.models.items()
        ] + [
            Budget("tenant", name, b.monthly_usd, b.hard_cap)
            for name, b in settings.tenants.items()
        ]
        self.ledger = SpendLedger(budgets, origin=origin, thresholds=settings.thresholds)
        self.enabled = bool(self.ledger)
        self.hook = hook
        self._clock = clock
        self._capped = any(b.hard_cap for b in budgets)

    def __repr__(self) -> str:
        return f"<BudgetKeeper {self.ledger!r}>"

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

    def heard(self, payload: Mapping[str, Any]) -> None:
        """Fold in the spend a peer reported."""
        if self.enabled:
            self._alert(self.ledger.merge(payload, month=month_of(self._clock())))

    def _alert(self, alerts: list[Alert]) -> None:
        for a in alerts:
            b = a.budget
            self.hook(BudgetAlert(b.scope, b.name, a.threshold, a.spent_usd, b.limit_usd, a.month))

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
