"""The worker's budgets: reserve before a call, settle after, and hard caps that hold."""

from __future__ import annotations

import asyncio
import calendar
from typing import Any

import pytest

from schemas.settings import BudgetsSettings
from workers.events import Event, SpendAlert
from workers.spend_limits import NULL_HOLD, Hold, SpendLimits, month_of

JULY = calendar.timegm((2026, 7, 31, 23, 59, 0))
AUGUST = calendar.timegm((2026, 8, 1, 0, 1, 0))


class Clock:
    def __init__(self, now: float = JULY) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def keeper(
    clock: Clock | None = None, events: list[Event] | None = None, **budgets: Any
) -> SpendLimits:
    settings = BudgetsSettings.model_validate(
        budgets or {"models": {"m1": {"monthly_usd": 10, "hard_cap": True}}}
    )
    seen = events if events is not None else []

    def hook(event: Event) -> None:
        seen.append(event)

    return SpendLimits(settings, origin="w1", hook=hook, clock=clock or Clock())


async def test_forty_concurrent_jobs_cannot_overrun_a_cap_one_job_exhausts() -> None:
    """The issue's case: 40 jobs in flight together, each of which spends the whole cap.
    Only one reaches the upstream; the others are refused before any call."""
    budgets = keeper()
    calls = 0

    async def job() -> str | None:
        nonlocal calls
        hold = budgets.reserve("m1", "acme", 10.0)
        if isinstance(hold, str):
            return hold
        try:
            calls += 1
            await asyncio.sleep(0.01)  # the upstream call: every job is in flight now
            budgets.settle(hold, 10.0)
        finally:
            budgets.release(hold)  # a no-op after settle: the caller's safety net
        return None

    refusals = await asyncio.gather(*(job() for _ in range(40)))
    assert calls == 1
    assert sum(r is not None for r in refusals) == 39
    assert budgets.ledger.spent("model:m1") == 10.0
    assert budgets.ledger.holds == 0 and budgets.ledger.reserved("model:m1") == 0.0


def test_refusals_say_which_budget_and_why_without_the_fleet_spend() -> None:
    """Spent: the old text. Reserved: the job's own worst case only, not others' spend."""
    budgets = keeper()
    first = budgets.reserve("m1", None, 6.0)
    assert isinstance(first, Hold)
    reserved = budgets.reserve("m1", None, 5.0)
    assert reserved == (
        "the monthly budget of model 'm1' (10.00 USD) cannot cover this job's worst-case"
        " cost (5.0000 USD) with what is already spent and reserved"
    )
    budgets.settle(first, 10.0)
    assert (
        budgets.reserve("m1", None, 0.0) == "the monthly budget of model 'm1' (10.00 USD) is spent"
    )
    assert budgets.check("m1", None) == "the monthly budget of model 'm1' (10.00 USD) is spent"


def test_no_budgets_cost_nothing_and_share_one_null_hold() -> None:
    """Without budgets every job gets the same null hold, and settling it does nothing."""
    budgets = SpendLimits(BudgetsSettings(), origin="w1")
    hold = budgets.reserve("m1", "acme", 1e9)
    assert hold is NULL_HOLD and budgets.reserve("m2", None, 0.0) is NULL_HOLD
    budgets.settle(hold, 5.0)
    budgets.release(hold)
    assert not budgets.enabled and budgets.ledger.holds == 0
    assert budgets.payload() is None


def test_settle_counts_once_alerts_and_charges_the_model_that_served() -> None:
    """A settled cost alerts like spend(); settling twice or releasing after counts
    nothing; a fallback's cost goes to the fallback."""
    events: list[Event] = []
    budgets = keeper(
        events=events,
        models={"m1": {"monthly_usd": 10, "hard_cap": True}, "m2": {"monthly_usd": 10}},
    )
    hold = budgets.reserve("m1", None, 8.0)
    assert isinstance(hold, Hold)
    budgets.settle(hold, 6.0)
    budgets.settle(hold, 6.0)
    budgets.release(hold)
    assert budgets.ledger.spent("model:m1") == 6.0
    assert [e.threshold for e in events if isinstance(e, SpendAlert)] == [0.5]
    fallback = budgets.reserve("m1", None, 4.0)
    assert isinstance(fallback, Hold)
    budgets.settle(fallback, 3.0, model="m2")
    assert budgets.ledger.spent("model:m2") == 3.0 and budgets.ledger.spent("model:m1") == 6.0
    unreported = budgets.reserve("m1", None, 4.0)
    assert isinstance(unreported, Hold)
    budgets.settle(unreported, None)  # the upstream reported no usage: nothing to count
    assert budgets.ledger.spent("model:m1") == 6.0 and budgets.ledger.holds == 0


def test_a_hold_made_in_july_settles_into_august() -> None:
    """Across the month boundary the hold still counts against the cap, and its cost is
    August's (spend counts when the upstream answers)."""
    clock = Clock(JULY)
    budgets = keeper(clock)
    hold = budgets.reserve("m1", None, 7.0)
    assert isinstance(hold, Hold)
    clock.now = AUGUST
    assert isinstance(budgets.reserve("m1", None, 4.0), str)
    budgets.settle(hold, 2.0)
    assert budgets.view() == [
        {"scope": "model", "name": "m1", "limit_usd": 10.0, "hard_cap": True, "spent_usd": 2.0}
    ]
    assert budgets.payload() == {
        "month": month_of(AUGUST),
        "origins": {"w1": {"model:m1": 2.0}},
        "alerted": {},
    }


def test_check_and_spend_still_work_for_their_callers() -> None:
    """The older pair is kept until the worker is switched to reserve/settle."""
    budgets = keeper()
    assert budgets.check("m1", None) is None
    budgets.spend("m1", None, 10.0)
    assert budgets.check("m1", None) is not None


@pytest.mark.parametrize("estimate", [float("inf"), float("nan")])
def test_an_unbounded_estimate_is_refused_by_a_cap(estimate: float) -> None:
    """A job whose worst case is unknown cannot be reserved against a hard cap."""
    budgets = keeper()
    assert isinstance(budgets.reserve("m1", None, estimate), str)
    assert isinstance(budgets.reserve("uncapped", None, estimate), Hold)
