"""Interactive before batch in the routing core: the saturation gate, the floor, the budget."""

from __future__ import annotations

from workers.routing import EndpointSpec, RetryBudget, Router, Work
from workers.routing.values import Choice, NoChoice

INTERACTIVE = Work(10, 16)
BATCH = Work(10, 16, batch=True)


def router(max_concurrency: int) -> Router:
    r = Router([EndpointSpec(name="a", models={"m": "m"}, max_concurrency=max_concurrency)])
    # One sample: a cold endpoint takes one probe at a time, whatever the class.
    r.succeed(r.begin("a", work=INTERACTIVE, now=-1.0, model="m"), now=-0.9, output_tokens=16)
    return r


def fill(r: Router, work: Work, n: int, now: float = 0.0) -> int:
    """Begin attempts of ``work`` until the router refuses; how many began."""
    began = 0
    for _ in range(n):
        if not isinstance(r.pick("m", work=work, now=now, rand=lambda: 0.5), Choice):
            break
        r.begin("a", work=work, now=now, model="m")
        began += 1
    return began


def test_batch_leaves_headroom_that_interactive_may_take() -> None:
    r = router(20)  # headroom: 5 % of 20 = 1 slot
    assert fill(r, BATCH, 100) == 19
    assert fill(r, INTERACTIVE, 100) == 1


def test_interactive_may_use_every_slot_while_batch_is_not_waiting() -> None:
    r = router(20)
    assert fill(r, INTERACTIVE, 100) == 20


def test_interactive_leaves_the_floor_to_a_waiting_batch() -> None:
    r = router(20)
    began = [r.begin("a", work=INTERACTIVE, now=0.0, model="m") for _ in range(20)]
    assert isinstance(r.pick("m", work=BATCH, now=0.5, rand=lambda: 0.5), NoChoice)
    for attempt in began[:2]:  # two interactive jobs end; batch is waiting
        r.succeed(attempt, now=0.6, output_tokens=16)
    # Interactive may not take the two freed slots: they are batch's floor.
    assert isinstance(r.pick("m", work=INTERACTIVE, now=0.6, rand=lambda: 0.5), NoChoice)
    assert fill(r, BATCH, 10, now=0.6) == 2
    # Batch at its floor: the next freed slot is interactive's again.
    r.succeed(began[2], now=0.7, output_tokens=16)
    assert isinstance(r.pick("m", work=INTERACTIVE, now=0.7, rand=lambda: 0.5), Choice)


def test_interactive_takes_the_slots_beyond_a_waiting_batchs_floor() -> None:
    r = router(20)
    began = [r.begin("a", work=INTERACTIVE, now=0.0, model="m") for _ in range(20)]
    assert isinstance(r.pick("m", work=BATCH, now=0.5, rand=lambda: 0.5), NoChoice)
    for attempt in began[:5]:  # five slots free; batch, waiting, is owed two of them
        r.succeed(attempt, now=0.6, output_tokens=16)
    assert fill(r, INTERACTIVE, 10, now=0.6) == 3
    assert fill(r, BATCH, 10, now=0.6) == 2


def test_floor_lapses_when_batch_stops_asking() -> None:
    r = router(20)
    began = [r.begin("a", work=INTERACTIVE, now=0.0, model="m") for _ in range(20)]
    assert isinstance(r.pick("m", work=BATCH, now=0.5, rand=lambda: 0.5), NoChoice)
    r.succeed(began[0], now=5.0, output_tokens=16)  # long after batch last asked
    assert isinstance(r.pick("m", work=INTERACTIVE, now=5.0, rand=lambda: 0.5), Choice)


def test_one_slot_endpoint_has_no_headroom_or_floor() -> None:
    r = router(1)
    assert fill(r, BATCH, 5) == 1


def test_batch_retries_leave_part_of_the_reserve_to_interactive() -> None:
    budget = RetryBudget(0.0, 1.0, 10.0, batch_keep=0.5)  # reserve: 10 retries
    batch = sum(budget.try_spend(0.0, batch=True) for _ in range(20))
    interactive = sum(budget.try_spend(0.0) for _ in range(20))
    assert (batch, interactive) == (5, 5)


def test_budget_share_scales_the_reserve() -> None:
    budget = RetryBudget(0.0, 1.0, 10.0, batch_keep=0.0)
    budget.share(0.25)
    assert sum(budget.try_spend(0.0) for _ in range(20)) == 2  # 10 × 0.25, rounded down


def test_priority_tunables_are_shares() -> None:
    import pytest

    from workers.routing import RoutingConfig

    with pytest.raises(ValueError, match="batch_floor"):
        RoutingConfig(batch_floor=1.5)
