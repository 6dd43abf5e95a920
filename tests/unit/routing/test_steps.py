"""next_step (after a failed attempt) and should_hedge, branch by branch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from schemas.errors import ErrorCode
from schemas.settings import ModelSettings
from workers.routing import (
    Choice,
    EndpointSpec,
    FailureKind,
    GiveUp,
    NoChoice,
    Progress,
    RetryBudget,
    Step,
    TryNow,
    Wait,
    Work,
    next_step,
    should_hedge,
)

Make = Callable[..., Any]
WORK = Work(100, 200)


def step(
    h: Any,
    progress: Progress,
    kind: FailureKind = FailureKind.SERVER_ERROR,
    *,
    budget: RetryBudget | None = None,
    model: str = "m",
    max_attempts: int = 3,
    rand: Callable[[], float] = lambda: 0.5,
) -> Step:
    return next_step(
        progress,
        kind,
        router=h.router,
        budget=budget if budget is not None else RetryBudget(0.2, 10.0),
        model=model,
        work=WORK,
        now=h.now,
        rand=rand,
        max_attempts=max_attempts,
        margin_s=0.3,
    )


def fleet(make: Make, names: tuple[str, ...] = ("a", "b"), **kwargs: Any) -> Any:
    h = make(list(names), **kwargs)
    for _ in range(3):
        for name in names:
            h.serve(name, 0.1, gap_s=0.001)
    return h


def tried(
    h: Any, *endpoints: str, attempts: int | None = None, deadline_in: float = 30.0
) -> Progress:
    return Progress(
        attempts=len(endpoints) if attempts is None else attempts,
        tried=frozenset(endpoints),
        deadline=h.now + deadline_in,
    )


def test_progress_helpers() -> None:
    p = Progress(attempts=0, tried=frozenset(), deadline=10.0)
    p = p.attempted("a").attempted("b").waited()
    assert (p.attempts, p.tried, p.waits, p.hedged) == (2, frozenset({"a", "b"}), 1, False)


@pytest.mark.parametrize("kind", [FailureKind.BAD_REQUEST, FailureKind.TOO_LARGE])
def test_rejected_request_gives_up_at_once(make: Make, kind: FailureKind) -> None:
    h = fleet(make)
    result = step(h, tried(h, "a"), kind)
    assert result == GiveUp(ErrorCode.UPSTREAM_REJECTED, f"upstream rejected the request ({kind})")


def test_deadline_reached_gives_up(make: Make) -> None:
    h = fleet(make)
    result = step(h, tried(h, "a", deadline_in=0.2))
    assert isinstance(result, GiveUp) and result.code is ErrorCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        (FailureKind.SERVER_ERROR, ErrorCode.UPSTREAM_ERROR),
        (FailureKind.TIMEOUT, ErrorCode.UPSTREAM_ERROR),
        (FailureKind.RATE_LIMITED, ErrorCode.OVER_CAPACITY),
        (FailureKind.AUTH, ErrorCode.UPSTREAM_REJECTED),
        (FailureKind.NOT_FOUND, ErrorCode.UPSTREAM_REJECTED),
    ],
)
def test_attempts_exhausted(make: Make, kind: FailureKind, code: ErrorCode) -> None:
    h = fleet(make, ("a", "b", "c", "d"))
    result = step(h, tried(h, "a", "b", "c"), kind)
    assert isinstance(result, GiveUp) and result.code is code
    assert "3 attempt(s) failed" in result.message


@pytest.mark.parametrize(
    "kind",
    [
        FailureKind.REFUSED,
        FailureKind.TIMEOUT,
        FailureKind.SERVER_ERROR,
        FailureKind.MALFORMED,
        FailureKind.RATE_LIMITED,
        FailureKind.AUTH,
        FailureKind.NOT_FOUND,
    ],
)
def test_retriable_failure_tries_another_endpoint_now(make: Make, kind: FailureKind) -> None:
    h = fleet(make)
    budget = RetryBudget(0.0, 0.1)  # exactly one retry
    result = step(h, tried(h, "a"), kind, budget=budget)
    assert isinstance(result, TryNow) and result.choice.endpoint == "b"
    assert budget.balance(h.now) == 0.0  # the retry was paid for


def test_budget_exhausted_gives_up(make: Make) -> None:
    h = fleet(make)
    for kind, code in [
        (FailureKind.SERVER_ERROR, ErrorCode.UPSTREAM_ERROR),
        (FailureKind.RATE_LIMITED, ErrorCode.OVER_CAPACITY),
    ]:
        result = step(h, tried(h, "a"), kind, budget=RetryBudget(0.0, 0.0))
        assert isinstance(result, GiveUp) and result.code is code
        assert "retry budget exhausted" in result.message


def test_only_tried_endpoints_left_backs_off_then_retries_one(make: Make) -> None:
    h = fleet(make, ("a",))
    first = step(h, tried(h, "a"), rand=lambda: 0.5)
    assert first == Wait(0.25)  # U(0, 0.5 · 2^0) at 0.5
    again = step(h, tried(h, "a").waited())
    assert isinstance(again, TryNow) and again.choice.endpoint == "a"


def test_a_retry_after_keeps_this_job_off_the_tried_endpoints_until_then(make: Make) -> None:
    """Told "not before t" by a 429: poll for an untried endpoint, retry a tried one after t."""
    h = fleet(make, ("a",))
    progress = tried(h, "a").told_to_wait(h.now + 1.0).told_to_wait(h.now + 0.2)
    assert progress.not_before == h.now + 1.0  # the later of the two
    first = step(h, progress, FailureKind.RATE_LIMITED, rand=lambda: 0.99)
    assert isinstance(first, Wait) and first.delay_s == pytest.approx(0.495)  # backoff
    h.tick(first.delay_s)
    again = step(h, progress.waited(), FailureKind.RATE_LIMITED, rand=lambda: 0.99)
    assert isinstance(again, Wait) and again.delay_s == pytest.approx(0.505)  # until then
    h.tick(again.delay_s)
    result = step(h, progress.waited().waited(), FailureKind.RATE_LIMITED)
    assert isinstance(result, TryNow) and result.choice.endpoint == "a"


def test_backoff_grows_with_attempts_and_waits(make: Make) -> None:
    h = fleet(make, ("a",))
    progress = Progress(attempts=2, tried=frozenset({"a"}), deadline=h.now + 60, waits=0)
    assert step(h, progress, rand=lambda: 0.999) == Wait(pytest.approx(0.999))
    full = make([EndpointSpec("a", {"m": "m"}, 1)])
    full.begin("a")  # a is full: nothing usable, and no known time when it frees
    both = Progress(attempts=1, tried=frozenset({"z"}), deadline=full.now + 60, waits=3)
    assert step(full, both, rand=lambda: 0.999) == Wait(pytest.approx(3.996))


def test_backoff_that_cannot_fit_gives_up(make: Make) -> None:
    h = fleet(make, ("a",))
    result = step(h, tried(h, "a", deadline_in=0.5), rand=lambda: 0.99)
    assert (
        isinstance(result, GiveUp) and result.code is ErrorCode.UPSTREAM_ERROR
    )  # the deadline has not passed: the failure is the cause
    assert "no time left" in result.message


def test_cooldown_everywhere_waits_until_it_ends(make: Make) -> None:
    h = fleet(make)
    for name in ("a", "b"):
        h.failing(name, FailureKind.RATE_LIMITED, retry_after_s=4.0, rand=lambda: 0.0, count=2)
    result = step(h, tried(h, "a"), FailureKind.RATE_LIMITED, rand=lambda: 0.0)
    assert isinstance(result, Wait)
    assert result.delay_s == pytest.approx(4.0, abs=0.03)
    spread = step(h, tried(h, "a"), FailureKind.RATE_LIMITED, rand=lambda: 1.0)
    assert isinstance(spread, Wait)
    assert spread.delay_s == pytest.approx(4.5, abs=0.03)  # + up to backoff_base_s


def test_cooldown_past_the_deadline_gives_up_over_capacity(make: Make) -> None:
    h = fleet(make)
    for name in ("a", "b"):
        h.failing(name, FailureKind.RATE_LIMITED, retry_after_s=60.0, rand=lambda: 0.0, count=2)
    result = step(h, tried(h, "a", deadline_in=10.0), FailureKind.RATE_LIMITED)
    assert isinstance(result, GiveUp) and result.code is ErrorCode.OVER_CAPACITY
    assert "not before the deadline" in result.message


def test_ejected_untried_endpoints_mean_backing_off_for_a_tried_one(make: Make) -> None:
    """a and b ejected, c and d tried: back off, then c or d again (not a 30 s wait)."""
    h = fleet(make, ("a", "b", "c", "d"), jitter=lambda: 0.5)
    h.failing("a", count=5)
    h.failing("b", count=5)
    progress = tried(h, "c", "d", attempts=2, deadline_in=10.0)
    assert step(h, progress) == Wait(0.5)
    retry = step(h, progress.waited())
    assert isinstance(retry, TryNow) and retry.choice.endpoint in {"c", "d"}


@pytest.mark.parametrize("kind", [FailureKind.AUTH, FailureKind.NOT_FOUND])
def test_every_endpoint_unusable_gives_up_upstream_rejected(make: Make, kind: FailureKind) -> None:
    """401/403/404 everywhere is llmq's configuration, not an outage: not retriable
    (issue 16: it used to say no_healthy_endpoint, retriable, and SDKs retried)."""
    h = fleet(make)
    h.failing("a", kind)
    h.failing("b", kind)
    result = step(h, tried(h, "b"), kind)
    assert isinstance(result, GiveUp) and result.code is ErrorCode.UPSTREAM_REJECTED
    assert "check endpoints" in result.message
    # Later jobs of the model are refused the same way, before any attempt.
    later = h.pick()
    assert isinstance(later, NoChoice) and later.code is ErrorCode.UPSTREAM_REJECTED


def test_unusable_and_ejected_endpoints_give_up_no_healthy_endpoint(make: Make) -> None:
    """One misconfigured endpoint and one in an outage: the outage may end, so retriable."""
    h = fleet(make)
    h.failing("a", FailureKind.NOT_FOUND)
    h.failing("b", count=5)
    result = step(h, tried(h, "b"))
    assert isinstance(result, GiveUp) and result.code is ErrorCode.NO_HEALTHY_ENDPOINT


def test_unknown_model_gives_up(make: Make) -> None:
    h = fleet(make)
    result = step(h, tried(h, "a"), model="nope")
    assert isinstance(result, GiveUp) and result.code is ErrorCode.UNKNOWN_MODEL


def test_predicted_time_beyond_the_deadline_gives_up(make: Make) -> None:
    h = make(["a", "slow"])
    h.serve("slow", 5.0)
    h.begin("slow")  # busy: no idle decay
    result = step(h, tried(h, "a", deadline_in=2.0))
    assert (
        isinstance(result, GiveUp) and result.code is ErrorCode.UPSTREAM_ERROR
    )  # the deadline has not passed: the failure is the cause
    assert "slow needs ~5" in result.message


# --- hedging ---------------------------------------------------------------------


def hedge(h: Any, primary: Choice, **kwargs: Any) -> Choice | None:
    args: dict[str, Any] = {
        "router": h.router,
        "budget": RetryBudget(0.2, 10.0),
        "model": "m",
        "work": WORK,
        "now": h.now,
        "rand": lambda: 0.5,
    }
    args.update(kwargs)
    return should_hedge(primary, **args)


def primary_on(h: Any, endpoint: str = "a") -> Choice:
    return Choice(endpoint, "m", "m", 0.1)


def test_hedge_goes_to_another_endpoint_and_pays(make: Make) -> None:
    h = fleet(make)
    budget = RetryBudget(0.0, 0.1)
    second = hedge(h, primary_on(h), budget=budget, deadline=h.now + 10, margin_s=0.3)
    assert second is not None and second.endpoint == "b"
    assert budget.balance(h.now) == 0.0
    assert hedge(h, primary_on(h), budget=budget) is None  # nothing left to pay with


def test_hedge_waits_for_the_p95(make: Make) -> None:
    h = fleet(make)
    started = h.now
    assert hedge(h, primary_on(h), started=started) is None  # < 20 samples: no delay known
    for _ in range(20):
        h.serve("a", 0.1, gap_s=0.001)
    started = h.now
    assert hedge(h, primary_on(h), started=started) is None
    h.tick(0.2)
    assert hedge(h, primary_on(h), started=started) is not None


def test_no_hedge_without_another_endpoint_of_the_same_model(make: Make) -> None:
    models = {"m": ModelSettings(fallbacks=["n"])}
    h = make([EndpointSpec("a", {"m": "m"}, 64), EndpointSpec("b", {"n": "n"}, 64)], models=models)
    assert hedge(h, primary_on(h)) is None  # b serves only the fallback model
    assert hedge(h, primary_on(h), exclude=frozenset({"b"})) is None


def test_no_hedge_when_it_cannot_finish_before_the_deadline(make: Make) -> None:
    h = fleet(make)
    assert hedge(h, primary_on(h), deadline=h.now + 0.35, margin_s=0.3) is None


def test_a_busy_peer_is_waited_for_even_when_the_cooldown_is_long(make: Make) -> None:
    """a cools down for a minute, b is only busy: back off and look again, because
    b frees on a completion long before a's cooldown ends."""
    h = make([EndpointSpec("a", {"m": "m"}, 8), EndpointSpec("b", {"m": "m"}, 1)])
    h.serve("b", 0.1)
    h.begin("b")  # b is full
    h.failing("a", FailureKind.RATE_LIMITED, retry_after_s=60.0, rand=lambda: 0.0, count=2)
    result = step(h, tried(h, "a", deadline_in=10.0), FailureKind.RATE_LIMITED, rand=lambda: 0.5)
    assert isinstance(result, Wait)
    assert result.delay_s < 10.0
