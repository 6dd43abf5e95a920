"""attempt_timeout and hedge_delay: percentiles of latency normalised by work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from workers.routing import EndpointSpec, RoutingConfig, Work

Make = Callable[..., Any]


@pytest.mark.parametrize(
    ("max_tokens", "expected"),
    [
        (128_000, 600.0),  # 3600 s, clamped to 600 s
        (16_000, 450.0),
        (4096, 115.2),
        (100, 10.0),  # 2.8 s, raised to 10 s
        (None, 115.2),  # default_max_tokens = 4096
    ],
)
def test_default_timeout_scales_with_max_tokens(
    make: Make, max_tokens: int | None, expected: float
) -> None:
    h = make(["a"])
    timeout = h.router.attempt_timeout("a", work=Work(10, max_tokens), remaining_s=3600.0)
    assert timeout == pytest.approx(expected)


def test_deadline_clamps_the_timeout(make: Make) -> None:
    """remaining − margin (0.3 s) bounds every attempt; never negative."""
    h = make(["a"])
    assert h.router.attempt_timeout("a", work=Work(10, 4096), remaining_s=5.0) == pytest.approx(4.7)
    assert h.router.attempt_timeout("a", work=Work(10, 4096), remaining_s=0.1) == 0.0
    assert h.router.attempt_timeout("a", work=Work(10, 4096), remaining_s=-3.0) == 0.0


def test_endpoint_timeout_bounds_the_attempt(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m"}, 64, timeout_s=30.0)])
    assert h.router.attempt_timeout("a", work=Work(10, 128_000), remaining_s=999.0) == 30.0


def test_history_gives_a_padded_high_percentile_for_this_cap(make: Make) -> None:
    """With ≥ 20 samples: pad 2 × p99.9 ratio × shape(max_tokens)."""
    h = make(["a"])
    for n in (100, 300) * 15:
        h.serve("a", 0.2 + 0.01 * n, tokens=n, gap_s=0.001)
    timeout = h.router.attempt_timeout("a", work=Work(10, 1000), remaining_s=3600.0)
    assert timeout == pytest.approx(2 * (0.2 + 0.01 * 1000), rel=0.1)
    short = h.router.attempt_timeout("a", work=Work(10, 1), remaining_s=3600.0)
    assert short == pytest.approx(1.0)  # min_attempt_timeout_s


def test_too_little_history_keeps_the_default(make: Make) -> None:
    h = make(["a"])
    h.serve("a", 0.5, count=19)
    assert h.router.attempt_timeout("a", work=Work(10, 4096), remaining_s=3600) == pytest.approx(
        115.2
    )


def test_hedge_delay_is_the_p95_after_enough_samples(make: Make) -> None:
    h = make(["a"], config=RoutingConfig(hedge_min_samples=20))
    assert h.router.hedge_delay("a", work=Work(10, 200)) is None
    for i in range(40):
        h.serve("a", 1.0 if i % 20 else 3.0, tokens=200, gap_s=0.001)  # 2 slow out of 40
    assert h.router.hedge_delay("a", work=Work(10, 200)) == pytest.approx(1.0, rel=0.05)
    for _ in range(4):
        h.serve("a", 3.0, tokens=200, gap_s=0.001)
    delay = h.router.hedge_delay("a", work=Work(10, 200), model="m")
    assert delay is not None and delay > 2.0


def test_a_streamed_attempt_is_timed_and_hedged_on_its_first_token(make: Make) -> None:
    """A stream's attempt ends at its first token: the shape at zero output tokens
    (the fitted base), not the whole answer the output cap allows."""
    h = make(["a"], config=RoutingConfig(hedge_min_samples=20))
    stream = Work(10, 1000, stream=True)
    # No history: the default for no output, 10 s, not the 1000-token default.
    assert h.router.attempt_timeout("a", work=stream, remaining_s=3600.0) == pytest.approx(10.0)
    for n in (100, 300) * 15:
        h.serve("a", 0.5 + 0.01 * n, tokens=n, gap_s=0.001)
    whole = h.router.attempt_timeout("a", work=Work(10, 1000), remaining_s=3600.0)
    first = h.router.attempt_timeout("a", work=stream, remaining_s=3600.0)
    assert first == pytest.approx(1.0, rel=0.2)  # 2 × ~0.5 s base
    assert whole > 10 * first
    hedge_whole = h.router.hedge_delay("a", work=Work(10, 1000))
    hedge_first = h.router.hedge_delay("a", work=stream)
    assert hedge_whole is not None and hedge_first is not None
    assert 0.5 <= hedge_first <= 1.0  # the base (0.5 s) times the p95 surprise
    assert hedge_whole > 4 * hedge_first
