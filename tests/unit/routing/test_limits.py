"""SlidingWindow (rpm/tpm: any 60-second window) and AimdLimit (concurrency learned from 429s)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.routing.limits import AimdLimit, Entry, SlidingWindow

STEPS = [0.0, 0.25, 1.0, 7.5, 30.0, 59.75, 60.0, 60.25, 90.0]
"""Time steps that land on, just before and just after a window's edge."""


def test_the_window_starts_empty_so_the_first_minute_holds_the_limit_not_twice_it() -> None:
    """rpm 600 asked for a request every 10 ms: 600 go in the first minute (a full
    token bucket refilling at 10/s let ~1200 through), then one per freed slot."""
    window = SlidingWindow(600)
    sent = []
    for now in (t / 100 for t in range(12_000)):
        if window.can_take(1, now):
            window.take(1, now)
            sent.append(now)
    first_minute = [t for t in sent if t < 60.0]
    assert len(first_minute) == 600
    assert first_minute[-1] == pytest.approx(5.99)
    assert len(sent) == 1200  # the second minute: each entry leaves at time + 60 s
    assert sent[600] == 60.0  # the entry of time 0 is out of (0, 60]


def test_ready_at_is_when_enough_entries_leave_the_window() -> None:
    window = SlidingWindow(3)
    for t in (0.0, 10.0, 20.0):
        window.take(1, t)
    assert not window.can_take(1, 25.0)
    assert window.ready_at(1, 25.0) == 60.0
    assert window.ready_at(2, 25.0) == 70.0
    assert window.ready_at(3, 25.0) == 80.0
    assert window.can_take(1, 60.0) and not window.can_take(2, 60.0)
    assert window.ready_at(1, 61.0) == 61.0  # fits now: now
    assert repr(window) == "<SlidingWindow 2.0/3 per 60s>"


def test_a_refund_goes_back_to_its_own_entry() -> None:
    """The unused part of one request's reservation frees room only while that
    request is in the window; a refund to an entry already out of it is void."""
    window = SlidingWindow(100)
    early = window.take(60, 0.0)
    late = window.take(40, 30.0)
    assert not window.can_take(1, 30.0)
    window.give(late, 25)
    window.give(late, -5)  # nothing
    assert (late.amount, window.total) == (15, 75)
    assert window.can_take(25, 30.0) and not window.can_take(26, 30.0)
    window.give(late, 1000)  # never more than it still counts
    assert (late.amount, window.total) == (0, 60)
    assert window.can_take(1, 60.0)  # early left at 60: the window is empty
    window.give(early, 60)  # out of the window: changes nothing
    assert (early.amount, window.total) == (0, 0)
    assert isinstance(early, Entry) and "at 0.000" in repr(early)


def test_a_request_larger_than_the_limit_goes_into_an_empty_window_only() -> None:
    """A 50k-token prompt against tpm 40k: admitted alone, then the window stays shut for 60 s."""
    window = SlidingWindow(40_000)
    window.take(1, 0.0)
    assert not window.can_take(50_000, 0.0)
    assert window.ready_at(50_000, 10.0) == 60.0  # when the window is empty
    assert window.can_take(50_000, 60.0)
    big = window.take(50_000, 60.0)
    assert not window.can_take(1, 119.0)
    assert window.ready_at(1, 100.0) == 120.0
    window.give(big, 45_000)  # it used little of its reservation
    assert window.can_take(35_000, 100.0) and not window.can_take(35_001, 100.0)


def test_a_refused_request_and_its_tokens_come_back() -> None:
    window = SlidingWindow(1)
    entry = window.take(1, 0.0)
    assert not window.can_take(1, 1.0)
    window.give(entry, 1)
    assert window.can_take(1, 1.0)


def test_time_going_backwards_reads_as_the_latest_time_seen() -> None:
    window = SlidingWindow(60)
    window.take(60, 10.0)
    assert not window.can_take(1, 5.0)
    assert window.take(1, 5.0).time == 10.0
    assert window.ready_at(1, 5.0) == 70.0


def test_a_lower_limit_applies_at_once() -> None:
    window = SlidingWindow(10)
    window.take(6, 0.0)
    window.set_limit(5, 1.0)
    assert window.limit == 5
    assert not window.can_take(1, 2.0)  # 6 already in the window: nothing until it leaves
    assert window.ready_at(1, 2.0) == 60.0
    assert window.can_take(5, 60.0)
    window.take(5, 60.0)
    assert not window.can_take(1, 60.0)


def test_a_higher_limit_applies_once_the_lower_one_is_out_of_the_window() -> None:
    """The limit in force is the smallest set at any time in the last 60 s."""
    window = SlidingWindow(5)
    window.take(1, 30.0)
    window.set_limit(10, 30.0)
    assert (window.limit, window.ready_at(5, 30.0)) == (5, 90.0)
    assert not window.can_take(5, 89.9)
    assert window.can_take(9, 90.0)  # the entry of 30 is out too: the window is empty
    window.take(1, 100.0)
    window.set_limit(3, 100.0)  # down: at once
    window.set_limit(20, 110.0)  # up: after 3 has been out of the window
    assert not window.can_take(3, 159.9)  # the entry of 100 is still in, under 3
    assert window.can_take(2, 159.9)
    assert window.can_take(20, 170.0)
    window.set_limit(20, 171.0)  # unchanged: nothing moves
    assert window.limit == 20


def test_a_steady_limit_rises_a_window_after_it_was_last_lower() -> None:
    """5 → 10 → 20 → (a dip to 8) → 30: each rise waits for every lower limit to age out."""
    window = SlidingWindow(5)
    window.set_limit(10, 0.0)
    window.set_limit(20, 30.0)
    window.set_limit(8, 40.0)
    window.set_limit(30, 45.0)
    expected = {59.9: 5, 60.0: 8, 104.9: 8, 105.0: 30}
    for t, limit in expected.items():
        window.can_take(0, t)
        assert window.limit == limit, t


def test_a_limit_of_zero_admits_nothing() -> None:
    window = SlidingWindow(0)
    assert not window.can_take(1, 0.0)
    assert window.ready_at(1, 0.0) is None  # never, by itself
    assert window.shut
    window.set_limit(4, 10.0)  # a worker joins at 0 and raises to its share
    assert not window.shut  # 0 until 70, but it opens by itself
    assert window.ready_at(1, 10.0) == 70.0
    assert not window.can_take(1, 69.0) and window.can_take(4, 70.0)
    full = SlidingWindow(2)
    full.take(1, 0.0)
    full.set_limit(0, 1.0)
    assert not full.can_take(1, 100.0)  # not even into an empty window
    assert full.ready_at(1, 100.0) is None


def test_many_takes_stay_cheap() -> None:
    """rpm 50 000 asked every 1 ms for two minutes: the deque never holds more than the limit."""
    window = SlidingWindow(50_000)
    for i in range(120_000):
        now = i / 1000
        if window.can_take(1, now):
            window.take(1, now)
        assert len(window._entries) <= 50_000
    assert window.total == 50_000


@dataclass
class _Ref:
    """What was taken, as the provider counts it."""

    times: list[float] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)

    def in_window(self, end: float) -> list[float]:
        return [a for t, a in zip(self.times, self.amounts, strict=True) if end - 60 < t <= end]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(STEPS),
        st.sampled_from(["take", "take", "take", "give"]),
        st.integers(0, 14),
        st.integers(0, 1000),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=_OPS)
def test_no_60s_window_ever_holds_more_than_the_limit(
    ops: list[tuple[float, str, int, int]],
) -> None:
    """Random takes (some larger than the limit), refunds and clock steps: every
    window (t − 60, t] sums to at most the limit, or holds one oversized
    request alone; a refusal is never needless; ready_at is the first time that fits."""
    limit = 10
    window = SlidingWindow(limit)
    ref = _Ref()
    handles: list[Entry] = []
    now = 0.0
    for step, op, amount, pick in ops:
        now += step
        if op == "give" and handles:
            i = pick % len(handles)
            if ref.times[i] > now - 60:  # out of the window a refund changes nothing
                given = min(amount % 12, ref.amounts[i])
                ref.amounts[i] -= given
            window.give(handles[i], amount % 12)
            continue
        need = amount % 15
        current = sum(ref.in_window(now))
        fits = current + need <= limit or (need > limit and current == 0)
        at = window.ready_at(need, now)
        assert at == _first_fit(ref, need, limit, now)
        assert window.can_take(need, now) == fits
        if fits:
            handles.append(window.take(need, now))
            ref.times.append(now)
            ref.amounts.append(need)
        for end in ref.times:
            held = [a for a in ref.in_window(end) if a > 0]
            assert sum(held) <= limit or len(held) == 1, (end, held)
        assert window.total == sum(ref.in_window(now))


def _first_fit(ref: _Ref, need: float, limit: float, now: float) -> float:
    for t in sorted({now, *(t + 60 for t in ref.times if t + 60 > now)}):
        current = sum(ref.in_window(t))
        if current + need <= limit or (need > limit and current == 0):
            return t
    raise AssertionError("an empty window always fits")


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(STEPS), st.sampled_from(["a", "b", "share"]), st.integers(0, 10)),
        max_size=80,
    )
)
def test_two_workers_whose_shares_move_never_exceed_the_endpoint_limit_together(
    ops: list[tuple[float, str, int]],
) -> None:
    """Endpoint rpm 10 split between two workers, the split moving at random
    (one worker's share falls as the other's rises): in every window the two
    together sent at most 10."""
    total = 10
    a, b = SlidingWindow(5), SlidingWindow(5)
    sent: list[float] = []
    now = 0.0
    for step, op, share in ops:
        now += step
        if op == "share":
            a.set_limit(share, now)
            b.set_limit(total - share, now)
            continue
        worker = a if op == "a" else b
        while worker.can_take(1, now):  # greedy: each sends all its window allows
            worker.take(1, now)
            sent.append(now)
        for end in sent:
            assert sum(1 for t in sent if end - 60 < t <= end) <= total, (end, sent)


def test_a_429_beside_others_cuts_toward_what_was_in_flight() -> None:
    """Refused at 9 in flight: the endpoint takes 8. Halving at most per 429 finds it in three."""
    limit = AimdLimit(64, 0.5)
    limit.on_rate_limited(9)
    assert limit.value == 32
    limit.on_rate_limited(9)
    assert limit.value == 16
    limit.on_rate_limited(9)
    assert limit.value == 8
    limit.on_rate_limited(30)  # more in flight than the limit (a race): still one less
    assert limit.value == 7


def test_aimd_grows_back_by_one_per_window_and_only_when_busy() -> None:
    """+1/limit per success while at least half of it is in use (TCP Reno)."""
    limit = AimdLimit(16, 0.5)
    limit.on_rate_limited(9)
    assert limit.limit == 8.0
    limit.on_success(3)  # 3·2 < 8: not near the limit, no growth
    assert limit.limit == 8.0
    for _ in range(9):
        limit.on_success(8)
    assert limit.value == 9  # about one window of successes, one more slot
    for _ in range(500):
        limit.on_success(16)
    assert limit.value == 16  # never above the configured ceiling
    assert repr(limit) == "<AimdLimit 16/16 proven=16>"


def test_a_429_at_an_in_flight_count_that_recently_succeeded_is_not_a_concurrency_limit() -> None:
    """Served 5 at once a moment ago, refused at 3: a shed or a rate limit, not capacity."""
    limit = AimdLimit(64, 0.5)
    limit.on_success(5)
    assert limit.proven == 5
    assert limit.on_rate_limited(3) is False
    assert (limit.value, limit.proven) == (64, 4)  # unchanged, and a little less sure
    assert limit.on_rate_limited(4) is False
    assert limit.on_rate_limited(4) is True  # proven fell to 3: now it is capacity
    assert limit.value == 32


def test_aimd_never_below_one() -> None:
    limit = AimdLimit(3, 0.9)
    for _ in range(10):
        limit.on_rate_limited(2)
    assert limit.value == 1
    assert limit.limit == 1.0
