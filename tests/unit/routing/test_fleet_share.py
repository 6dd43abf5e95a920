"""An endpoint's limits split over the live workers, and a joiner's room in the windows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.routing import EndpointSpec, Router, Work
from workers.routing.endpoint import split
from workers.routing.values import Choice, NoChoice

WORK = Work(10, 16)


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_shares_add_up_to_the_limit(total: int, count: int) -> None:
    shares = [split(total, i, count) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def router(**limits: int) -> Router:
    spec = EndpointSpec(name="a", models={"m": "m"}, **{"max_concurrency": 16, **limits})
    r = Router([spec])
    # One sample, long enough ago to have left every window.
    r.succeed(r.begin("a", work=WORK, now=-100.0, model="m"), now=-99.9, output_tokens=16)
    return r


def started(r: Router, now: float, n: int) -> int:
    began = 0
    for _ in range(n):
        if isinstance(r.pick("m", work=WORK, now=now, rand=lambda: 0.5), NoChoice):
            break
        r.begin("a", work=WORK, now=now, model="m")
        began += 1
    return began


def test_concurrency_share_of_four_workers() -> None:
    r = router()
    r.share(3, 4, now=0.0)
    assert r.snapshot(now=0.0)[0].capacity == 4
    assert started(r, 0.0, 100) == 4
    r.share(0, 1, now=1.0)  # the others left: the whole limit, at once
    assert r.snapshot(now=1.0)[0].capacity == 16


def test_more_workers_than_slots_leaves_some_with_none() -> None:
    r = router(max_concurrency=2)
    r.share(2, 3, now=0.0)
    assert r.snapshot(now=0.0)[0].capacity == 0
    assert isinstance(r.pick("m", work=WORK, now=0.0, rand=lambda: 0.5), NoChoice)


def test_rpm_share_rises_only_after_a_window() -> None:
    r2 = router(rpm=600, max_concurrency=10_000)
    r2.share(0, 4, now=0.0)
    assert started(r2, 0.0, 1000) == 150
    r2.share(0, 2, now=1.0)  # two workers left: 300 each, but not before 61 s
    assert started(r2, 30.0, 1000) == 0
    assert started(r2, 61.5, 1000) == 300


def test_a_joiner_gets_only_the_room_the_others_windows_leave() -> None:
    r = router(rpm=600, max_concurrency=10_000)
    r.share(3, 4, now=0.0)  # joined as the fourth: its share is 150
    # The three others had 200 each (their old share) in their windows.
    r.leave_room(4, {0: {"a": (200.0, None)}, 1: {"a": (200.0, None)}, 2: {"a": (200.0, None)}})
    assert started(r, 0.0, 1000) == 0
    choice = r.pick("m", work=WORK, now=0.0, rand=lambda: 0.5)
    assert isinstance(choice, NoChoice) and choice.retry_at is not None  # it will ask again
    # Their old requests age out: 100 each now, and they may fill up to 150 each.
    r.leave_room(4, {0: {"a": (100.0, None)}, 1: {"a": (100.0, None)}, 2: {"a": (100.0, None)}})
    assert started(r, 1.0, 1000) == 150


def test_a_peer_that_reports_nothing_counts_at_its_share() -> None:
    r = router(rpm=600, max_concurrency=10_000)
    r.share(1, 2, now=0.0)
    r.leave_room(2, {0: {}})
    assert isinstance(r.pick("m", work=WORK, now=0.0, rand=lambda: 0.5), Choice)
    assert started(r, 0.0, 1000) == 300


def test_tpm_shares_caps_and_reported_use() -> None:
    r = router(rpm=600, tpm=60_000, max_concurrency=10_000)
    r.share(1, 2, now=0.0)
    assert r.window_use(now=0.0) == {"a": (0.0, 0.0)}
    r.leave_room(2, {0: {"a": (100.0, 50_000.0)}})
    state = r._states["a"]
    assert state.rpm is not None and state.tpm is not None
    assert (state.rpm.cap, state.tpm.cap) == (300.0, 10_000.0)
    r.leave_room(1, {})  # alone again: no cap
    assert state.tpm.cap == float("inf")
    r.begin("a", work=WORK, now=1.0, model="m")
    rpm_used, tpm_used = r.window_use(now=1.0)["a"]
    assert rpm_used == 1.0 and tpm_used is not None and tpm_used > 0


def test_a_share_out_of_range_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="share 4 of 4"):
        router().share(4, 4, now=0.0)


def test_the_same_share_again_changes_nothing() -> None:
    r = router()
    r.share(0, 2, now=0.0)
    r.share(0, 2, now=1.0)
    assert r.snapshot(now=1.0)[0].capacity == 8


def test_a_429_at_a_share_of_zero_admits_nothing() -> None:
    from workers.routing.limits import AimdLimit

    limit = AimdLimit(4, 0.5)
    limit.rescale(0)
    assert limit.value == 0
    limit.on_rate_limited(3)
    assert limit.value == 0
    limit.rescale(4)
    assert limit.value >= 1


def test_a_tpm_only_endpoint() -> None:
    r = router(tpm=60_000, max_concurrency=10_000)
    r.share(0, 2, now=0.0)
    r.begin("a", work=WORK, now=0.0, model="m")
    r.leave_room(2, {1: {"a": (None, 40_000.0)}})
    state = r._states["a"]
    assert state.rpm is None and state.tpm is not None and state.tpm.cap == 20_000.0
    rpm_used, tpm_used = r.window_use(now=30.0)["a"]  # reading later moves the window
    assert rpm_used is None and tpm_used is not None and tpm_used > 0
    assert r.window_use(now=61.0)["a"] == (None, 0.0)
