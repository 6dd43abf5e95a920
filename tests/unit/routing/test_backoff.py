"""Full-jitter backoff: bounds, cap, truncation, overflow."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.routing import backoff


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0)]
)
def test_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff(attempt, rand=1.0, remaining_s=100.0) == pytest.approx(ceiling)
    assert backoff(attempt, rand=0.5, remaining_s=100.0) == pytest.approx(ceiling / 2)
    assert backoff(attempt, rand=0.0, remaining_s=100.0) == 0.0


def test_truncated_to_the_time_left() -> None:
    assert backoff(4, rand=0.9, remaining_s=1.5) == 1.5
    assert backoff(4, rand=0.9, remaining_s=-2.0) == 0.0


def test_huge_and_negative_attempts_are_safe() -> None:
    assert backoff(10_000, rand=0.5, remaining_s=100.0) == pytest.approx(4.0)
    assert backoff(10**100, rand=0.5, remaining_s=100.0) == pytest.approx(4.0)
    assert backoff(-7, rand=1.0, remaining_s=100.0) == pytest.approx(0.5)


def test_draws_outside_unit_interval_are_clamped() -> None:
    assert backoff(0, rand=3.0, remaining_s=100.0) == pytest.approx(0.5)
    assert backoff(0, rand=-1.0, remaining_s=100.0) == 0.0


def test_custom_base_and_cap() -> None:
    assert backoff(3, rand=1.0, base_s=0.025, cap_s=0.25, remaining_s=9.0) == pytest.approx(0.2)
    assert backoff(9, rand=1.0, base_s=0.025, cap_s=0.25, remaining_s=9.0) == pytest.approx(0.25)
    assert backoff(3, rand=1.0, base_s=-1.0, remaining_s=9.0) == 0.0


@given(
    attempt=st.integers(min_value=-10, max_value=10**6),
    rand=st.floats(min_value=0.0, max_value=1.0),
    base=st.floats(min_value=0.0, max_value=100.0),
    cap=st.floats(min_value=0.0, max_value=1000.0),
    remaining=st.floats(min_value=-100.0, max_value=1e6),
)
def test_always_within_bounds(
    attempt: int, rand: float, base: float, cap: float, remaining: float
) -> None:
    delay = backoff(attempt, rand=rand, base_s=base, cap_s=cap, remaining_s=remaining)
    assert 0.0 <= delay <= max(min(cap, remaining), 0.0)
