"""Router health: ejection, half-open probes, panic, 429 cooldowns, unusable endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from schemas.errors import ErrorCode
from workers.routing import Choice, EndpointSpec, FailureKind, NoChoice, RoutingConfig, Work

Make = Callable[..., Any]


def warm(h: Any, names: list[str], latency: float = 0.1) -> None:
    for _ in range(5):
        for name in names:
            h.serve(name, latency, gap_s=0.001)


@pytest.mark.parametrize(
    "kind",
    [FailureKind.REFUSED, FailureKind.TIMEOUT, FailureKind.SERVER_ERROR, FailureKind.MALFORMED],
)
def test_every_endpoint_failure_class_ejects(make: Make, kind: FailureKind) -> None:
    h = make(["a", "b", "c"], jitter=lambda: 0.5)
    warm(h, ["a", "b", "c"])
    h.failing("a", kind, count=5)
    status = h.status("a")
    assert status.state == "open"
    assert status.ejections == 1
    assert status.available_at == pytest.approx(h.now + 30.0)
    assert "a" not in h.shares(30)


def test_half_open_probe_then_close(make: Make) -> None:
    h = make(["a", "b", "c"], jitter=lambda: 0.5)
    warm(h, ["a", "b", "c"], latency=0.2)
    h.failing("a", count=5)
    h.tick(30.0)
    assert h.status("a").state == "half_open"
    warm(h, ["b", "c"], latency=0.2)  # keep b and c busy-recent
    probe = None
    for _ in range(50):
        choice = h.choose()
        if choice.endpoint == "a":
            probe = h.begin("a")
            break
        h.serve(choice.endpoint, 0.2, gap_s=0.001)
    assert probe is not None and probe.probe
    assert "a=probing" not in str(h.pick())  # picks go on elsewhere...
    assert "a" not in h.shares(20)  # ...and never to a second probe
    explained = {c.name: c.skip for c in h.router.explain("m", work=Work(1, 1), now=h.now)}
    assert explained["a"] == "probing"
    h.tick(0.1)
    h.router.succeed(probe, now=h.now, output_tokens=200)
    assert h.status("a").state == "closed"
    assert h.status("a").failure_rate == 0.0  # a closed circuit starts afresh


def test_probe_failure_doubles_the_jittered_ejection(make: Make) -> None:
    h = make(["a", "b", "c"], jitter=lambda: 0.0)
    warm(h, ["a", "b", "c"])
    h.failing("a", count=5)
    first = h.status("a").available_at - h.now
    assert first == pytest.approx(24.0)  # 30 s − 20%
    h.tick(first)
    probe = h.begin("a")
    assert probe.probe
    h.tick(0.5)
    h.router.fail(probe, FailureKind.TIMEOUT, now=h.now, rand=lambda: 1.0)
    assert h.status("a").available_at - h.now == pytest.approx(72.0)  # 60 s + 20%
    assert h.status("a").ejections == 2


def test_panic_routes_over_all_when_most_are_ejected(make: Make) -> None:
    """Never more than half of a model's endpoints out: with 3 of 4 ejected, all are used."""
    h = make(["a", "b", "c", "d"], jitter=lambda: 0.5)
    warm(h, ["a", "b", "c", "d"])
    h.failing("a", count=5)
    h.failing("b", count=5)
    assert set(h.shares(40)) <= {"c", "d"}  # two of four out: allowed
    assert isinstance(h.pick(exclude=frozenset({"c", "d"})), NoChoice)
    h.failing("c", count=5)
    panic = h.pick(exclude=frozenset({"d"}))
    assert isinstance(panic, Choice) and panic.endpoint in {"a", "b", "c"}
    # Panic ignores health but not capacity or exclusion.
    rows = {c.name: c.skip for c in h.router.explain("m", work=Work(1, 1), now=h.now)}
    assert rows == {"a": None, "b": None, "c": None, "d": None}
    only = h.pick(exclude=frozenset({"d", "a", "b"}))
    assert isinstance(only, Choice) and only.endpoint == "c"
    h.failing("c", FailureKind.RATE_LIMITED, retry_after_s=60.0, count=2)  # now cooling down
    rows = {c.name: c.skip for c in h.router.explain("m", work=Work(1, 1), now=h.now)}
    assert rows["c"] == "cooldown"
    assert isinstance(h.pick(exclude=frozenset({"d", "a", "b"})), NoChoice)


def test_single_endpoint_is_never_ejected_out_of_service(make: Make) -> None:
    h = make(["solo"])
    h.failing("solo", FailureKind.REFUSED, count=5)
    assert h.status("solo").state == "open"
    assert h.choose().endpoint == "solo"


def test_no_healthy_endpoint_when_ejected_and_the_rest_excluded(make: Make) -> None:
    h = make(["a", "b", "c", "d"], jitter=lambda: 0.5)
    warm(h, ["a", "b", "c", "d"])
    h.failing("a", count=5)
    refused = h.pick(exclude=frozenset({"b", "c", "d"}))
    assert isinstance(refused, NoChoice)
    assert refused.code is ErrorCode.NO_HEALTHY_ENDPOINT
    assert refused.retry_at == pytest.approx(h.now + 30.0)
    assert "a=ejected" in refused.reason


def test_a_lone_429_costs_the_job_a_retry_not_the_endpoint_a_cooldown(make: Make) -> None:
    """One 429 with nothing else in flight is as often a shed as a limit: no cooldown yet."""
    h = make(["a", "b"])
    warm(h, {"a": 0.1, "b": 0.2})
    h.failing("a", FailureKind.RATE_LIMITED, retry_after_s=20.0)
    status = h.status("a")
    assert (status.state, status.rate_limited, status.capacity) == ("closed", 1, 64)
    assert status.consecutive_failures == 0  # not a health failure either
    assert h.choose().endpoint == "a"
    h.serve("a", 0.1)  # a success between: the next lone 429 is the first again
    h.failing("a", FailureKind.RATE_LIMITED, retry_after_s=20.0)
    assert h.status("a").state == "closed"


def test_429_cooldown_honours_retry_after_with_jitter(make: Make) -> None:
    """The second lone 429 in a row cools the endpoint down for Retry-After × U[1, 1.5]."""
    h = make(["a", "b"])
    warm(h, ["a", "b"])
    h.failing("a", FailureKind.RATE_LIMITED, retry_after_s=20.0, rand=lambda: 0.0, count=2)
    status = h.status("a")
    assert status.state == "cooldown"
    assert status.available_at == pytest.approx(h.now + 20.0)
    assert status.consecutive_failures == 0  # not a health failure
    assert status.rate_limited == 2
    assert status.capacity == 64  # nothing else was in flight: not a concurrency limit
    assert h.shares(10) == {"b": 10}
    h.failing("b", FailureKind.RATE_LIMITED, retry_after_s=20.0, rand=lambda: 1.0, count=2)
    assert h.status("b").available_at == pytest.approx(h.now + 30.0)  # ×1.5
    refused = h.pick()
    assert isinstance(refused, NoChoice)
    assert refused.code is ErrorCode.OVER_CAPACITY
    assert refused.retry_at == pytest.approx(status.available_at)
    h.tick(20.0)
    assert h.choose().endpoint == "a"


def test_a_429_beside_other_requests_lowers_the_concurrency_not_the_availability(
    make: Make,
) -> None:
    """Refused as the 9th in flight: the endpoint stays open, with fewer slots."""
    h = make([EndpointSpec("a", {"m": "m"}, 16), EndpointSpec("b", {"m": "m"}, 16)])
    warm(h, {"a": 0.1, "b": 0.2})
    running = [h.begin("a") for _ in range(9)]
    h.tick(0.01)
    h.router.fail(running.pop(), FailureKind.RATE_LIMITED, now=h.now, retry_after_s=1.0)
    status = h.status("a")
    assert (status.state, status.capacity, status.rate_limited) == ("closed", 8, 1)
    assert h.choose().endpoint == "b"  # a is full at 8
    h.tick(0.09)
    h.router.succeed(running.pop(), now=h.now, output_tokens=200)
    rows = {c.name: c.skip for c in h.router.explain("m", work=Work(100, 200), now=h.now)}
    assert rows["a"] is None  # a slot is free again


def test_retry_after_is_capped(make: Make) -> None:
    h = make(["a"])
    h.failing("a", FailureKind.RATE_LIMITED, retry_after_s=86_400.0, rand=lambda: 0.0, count=2)
    assert h.status("a").available_at == pytest.approx(h.now + 300.0)
    h2 = make(["a"])
    h2.failing("a", FailureKind.RATE_LIMITED, retry_after_s=-5.0, rand=lambda: 0.0, count=2)
    assert h2.status("a").state == "closed"


def test_429_without_retry_after_doubles_a_short_default(make: Make) -> None:
    h = make(["a"], config=RoutingConfig(cooldown_jitter=0.0, cooldown_after=1))
    waits = []
    for _ in range(7):
        h.failing("a", FailureKind.RATE_LIMITED, elapsed_s=0.0)
        waits.append(h.status("a").available_at - h.now)
        h.tick(waits[-1])
    assert waits == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
    h.serve("a", 0.1)
    h.failing("a", FailureKind.RATE_LIMITED, elapsed_s=0.0)
    assert h.status("a").available_at - h.now == pytest.approx(1.0)  # a success resets


def test_503_with_retry_after_cools_down_too(make: Make) -> None:
    h = make(["a", "b"])
    h.failing("a", FailureKind.SERVER_ERROR, retry_after_s=10.0, rand=lambda: 0.0)
    assert h.status("a").state == "cooldown"
    assert h.status("a").failures == 1


@pytest.mark.parametrize("kind", [FailureKind.AUTH, FailureKind.NOT_FOUND])
def test_auth_and_not_found_make_the_endpoint_unusable_for_that_model(
    make: Make, kind: FailureKind
) -> None:
    h = make([EndpointSpec("a", {"m": "m", "n": "n"}, 64), EndpointSpec("b", {"m": "m"}, 64)])
    warm(h, ["a", "b"])
    h.failing("a", kind, model="m")
    assert h.status("a").unusable_models == ("m",)
    assert h.status("a").state == "closed"  # still serves n
    assert h.status("a").consecutive_failures == 0
    assert h.shares(10) == {"b": 10}
    assert h.choose("n").endpoint == "a"
    refused = h.pick(exclude=frozenset({"b"}))
    assert isinstance(refused, NoChoice)
    assert refused.code is ErrorCode.NO_HEALTHY_ENDPOINT
    assert refused.retry_at == pytest.approx(h.now + RoutingConfig().auth_unusable_s)
    h.tick(RoutingConfig().auth_unusable_s)
    assert h.status("a").unusable_models == ()
    assert "a" in h.shares(50)


def test_auth_without_a_model_marks_every_model(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m", "n": "n"}, 64)])
    h.failing("a", FailureKind.AUTH)
    assert h.status("a").state == "unusable"
    assert isinstance(h.pick("n"), NoChoice)


def test_single_model_endpoint_infers_the_model(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m"}, 64)])
    assert h.begin("a").model == "m"
    h.failing("a", FailureKind.AUTH)
    assert h.status("a").unusable_models == ("m",)
    assert h.status("a").state == "unusable"


@pytest.mark.parametrize("kind", [FailureKind.BAD_REQUEST, FailureKind.TOO_LARGE])
def test_rejected_requests_do_not_touch_health(make: Make, kind: FailureKind) -> None:
    h = make(["a"])
    h.failing("a", kind, count=10)
    status = h.status("a")
    assert (status.state, status.failures, status.in_flight) == ("closed", 0, 0)
    assert status.failure_rate == 0.0


def test_cancel_frees_the_slot_without_a_sample(make: Make) -> None:
    h = make(["a", "b", "c"], jitter=lambda: 0.5)
    attempt = h.begin("a")
    h.router.cancel(attempt, now=h.now)
    status = h.status("a")
    assert (status.in_flight, status.samples, status.cancelled) == (0, 0, 1)
    # A late result of a finished attempt is ignored, whatever it says.
    h.router.succeed(attempt, now=h.now, output_tokens=10)
    h.router.fail(attempt, FailureKind.TIMEOUT, now=h.now)
    h.router.cancel(attempt, now=h.now)
    status = h.status("a")
    assert (status.successes, status.failures, status.cancelled) == (0, 0, 1)


def test_cancelled_or_rate_limited_probe_frees_the_probe_slot(make: Make) -> None:
    h = make(["a", "b", "c"], jitter=lambda: 0.5)
    warm(h, ["a", "b", "c"])
    h.failing("a", count=5)
    h.tick(30.0)
    probe = h.begin("a")
    h.router.cancel(probe, now=h.now)
    probe = h.begin("a")
    assert probe.probe
    h.router.fail(probe, FailureKind.RATE_LIMITED, now=h.now, retry_after_s=0.0)
    assert h.begin("a").probe


def test_success_without_usage_uses_the_predicted_tokens(make: Make) -> None:
    h = make(["a"])
    attempt = h.begin("a", Work(10, 300))
    h.tick(1.0)
    h.router.succeed(attempt, now=h.now, output_tokens=None)
    assert h.status("a").samples == 1
    assert h.choose(work=Work(10, 300)).predicted_s == pytest.approx(1.0)


def test_observe_remote_holds_an_endpoint_open(make: Make) -> None:
    h = make(["a", "b", "c"])
    h.router.observe_remote("a", ejected_for_s=60.0, now=h.now)
    h.router.observe_remote("zz", ejected_for_s=60.0, now=h.now)
    h.router.observe_remote("b", ejected_for_s=0.0, now=h.now)
    assert h.status("a").state == "open"
    assert h.status("a").ejections == 0
    assert h.status("b").state == "closed"


def test_snapshot_and_repr_show_health_as_data(make: Make) -> None:
    h = make(["a", "b"])
    h.serve("a", 0.2)
    h.begin("a")
    status = h.status("a")
    assert (status.in_flight, status.samples, status.attempts, status.successes) == (1, 1, 2, 1)
    assert status.predicted_s is not None
    assert h.status("b").predicted_s is None
    state = h.router._states["a"]
    text = repr(state)
    assert "in_flight=1/64" in text and "samples=1" in text and "EndpointState a" in text
    assert repr(h.router) == "<Router endpoints=2 models=1 policy=latency>"
    assert repr(h.router.catalog) == "<Catalog names=1>"
    assert repr(h.router.workload) == "<Workload typical_output={'m': 200}>"
    h.failing("b", FailureKind.RATE_LIMITED, retry_after_s=1.0, rand=lambda: 0.0, count=2)
    h.failing("b", FailureKind.AUTH)
    b = h.router._states["b"]
    assert repr(b.cooldown) == f"<Cooldown until={h.now - 0.01 + 1.0:.3f} streak=2>"
    assert repr(b.unusable).startswith("<Unusable {'m': ")
