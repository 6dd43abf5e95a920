"""LatencyEstimator: the work-normalised shape, the peak-biased level, the percentile windows."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from workers.routing import RoutingConfig
from workers.routing.estimator import LatencyEstimator, _Window

CFG = RoutingConfig()


def fed(samples: list[tuple[float, float]], *, gap_s: float = 0.1) -> LatencyEstimator:
    est = LatencyEstimator(CFG)
    now = 0.0
    for latency, tokens in samples:
        now += gap_s
        est.observe(latency, tokens, now)
    return est


def test_first_sample_sets_the_shape_with_the_prior_proportions() -> None:
    """One sample: the line passes through it, split like the prior (0.5 s + 0.02 s/token)."""
    est = fed([(3.0, 100)])
    assert est.shape(100) == pytest.approx(3.0)
    prior = CFG.prior_base_s + CFG.prior_per_token_s * 100
    assert est.base_s == pytest.approx(3.0 * CFG.prior_base_s / prior)
    assert est.level == 1.0
    assert est.samples == 1


def test_a_slower_sample_moves_the_level_half_way_at_once() -> None:
    """level += rise · (ratio − level): a ×5 sample shows as ×3 at once, more after two."""
    est = fed([(1.0, 100)] * 10)
    est.observe(5.0, 100, 10.0)
    assert est.level == pytest.approx(3.0, rel=0.05)
    ratio = 5.0 / est.shape(100)  # the fit has moved a little toward the slow sample
    est.observe(5.0, 100, 10.0)
    assert est.level == pytest.approx(3.0 + 0.5 * (ratio - 3.0), rel=0.01)


def test_finagle_rise_adopts_the_peak_whole() -> None:
    est = LatencyEstimator(RoutingConfig(level_rise=1.0))
    for t in range(10):
        est.observe(1.0, 100, t * 0.1)
    est.observe(5.0, 100, 10.0)
    assert est.level == pytest.approx(5.0, rel=0.05)


def test_sparse_faster_samples_pull_the_level_down_with_time_weight() -> None:
    """Below the level, samples Δt apart: level·w + ratio·(1 − w), w = exp(−Δt/τ)."""
    est = fed([(1.0, 100)] * 10)
    est.observe(5.0, 100, 10.0)
    before, shape = est.level, est.shape(100)
    est.observe(1.0, 100, 13.0)
    w = math.exp(-3.0 / CFG.tau_s)
    assert est.level == pytest.approx(before * w + (1.0 / shape) * (1 - w))


def test_frequent_faster_samples_weigh_at_least_alpha_each() -> None:
    """At 1,000 samples/s the time weight is ~0; the per-sample floor still moves the level."""
    est = fed([(1.0, 100)] * 10)
    est.observe(5.0, 100, 10.0)
    before, shape = est.level, est.shape(100)
    est.observe(1.0, 100, 10.001)
    alpha = CFG.level_alpha
    assert est.level == pytest.approx(before * (1 - alpha) + (1.0 / shape) * alpha)
    for i in range(60):  # a slow spell is forgotten in tens of samples, not tens of seconds
        est.observe(1.0, 100, 10.002 + i * 0.001)
    assert est.level == pytest.approx(1.0, abs=0.05)


def test_censored_attempt_raises_the_level_but_never_lowers_it() -> None:
    """An attempt abandoned after t took at least t: a lower bound, not a sample."""
    est = fed([(1.0, 100)] * 10)
    samples, stamp = est.samples, est.stamp
    est.censor(0.5, 100, 20.0)  # faster than usual: says nothing
    assert (est.level, est.stamp) == (pytest.approx(1.0), stamp)
    est.censor(5.0, 100, 21.0)
    assert est.level == pytest.approx(3.0, rel=0.05)
    assert est.stamp == 21.0
    assert est.samples == samples  # not a sample: no percentile, no fit
    assert est.quantile(1.0) == pytest.approx(1.0)


def test_censor_without_history_does_nothing() -> None:
    est = LatencyEstimator(CFG)
    est.censor(30.0, 100, 1.0)
    assert (est.level, est.samples) == (1.0, 0)


def test_fit_recovers_base_and_per_token_time() -> None:
    """Varied lengths on y = 0.2 + 0.01·n: the line is learned."""
    samples = [(0.2 + 0.01 * n, n) for n in [10, 500, 50, 1000, 200, 800, 5, 300] * 10]
    est = fed(samples)
    assert est.base_s == pytest.approx(0.2, rel=0.02)
    assert est.per_token_s == pytest.approx(0.01, rel=0.02)


def test_long_generation_does_not_look_slow() -> None:
    """A 2000-token answer at the usual speed is not a latency peak."""
    samples = [(0.2 + 0.01 * n, n) for n in [10, 500, 50, 1000, 200, 800] * 10]
    est = fed(samples)
    est.observe(0.2 + 0.01 * 2000, 2000, 100.0)
    assert est.level == pytest.approx(1.0, abs=0.05)


def test_constant_length_falls_back_to_the_prior_slope() -> None:
    """All samples 100 tokens: the slope cannot be measured; the prior's proportions hold."""
    est = fed([(3.0, 100)] * 30)
    prior_slope = 3.0 * CFG.prior_per_token_s / (CFG.prior_base_s + CFG.prior_per_token_s * 100)
    assert est.per_token_s == pytest.approx(prior_slope)
    assert est.shape(100) == pytest.approx(3.0)


def test_slope_is_never_negative_and_base_never_negative() -> None:
    """Latency falling with length (noise) clamps the slope at 0; a steep one keeps base >= 0."""
    falling = fed([(5.0 - 0.004 * n, n) for n in [0, 1000, 100, 900] * 10])
    assert falling.per_token_s == 0.0
    # y = 0.01·n − 1: the best line has a negative base; clamped to base 0.
    steep = fed([(0.01 * n - 1.0, n) for n in [200, 400] * 10])
    assert steep.base_s == pytest.approx(0.0, abs=1e-12)
    assert steep.per_token_s == pytest.approx(2.0 / 300, rel=0.01)


def test_zero_tokens_and_zero_prior_are_safe() -> None:
    """No output tokens and a zero prior: no division by zero."""
    cfg = RoutingConfig(prior_base_s=0.0, prior_per_token_s=0.0, ridge_tokens=0.0)
    est = LatencyEstimator(cfg)
    est.observe(0.0, 0, 1.0)
    est.observe(1.0, 0, 2.0)
    assert est.per_token_s == 0.0
    assert est.base_s == pytest.approx(0.5, rel=0.05)


def test_quantile_nearest_rank_and_ring() -> None:
    """None without samples; nearest rank; only the last latency_window ratios count."""
    est = LatencyEstimator(RoutingConfig(latency_window=4))
    assert est.quantile(0.5) is None
    est.observe(1.0, 0, 1.0)
    assert est.quantile(0.99) == 1.0
    for i, latency in enumerate([2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0]):
        est.observe(latency, 0, 2.0 + i)
    # The window holds four ratios of ~1 after the spike has rolled out.
    assert est.quantile(1.0) == pytest.approx(est.quantile(0.0) or 0.0, rel=0.5)
    assert est.quantile(0.0) is not None


@given(
    st.lists(st.floats(min_value=0.0, max_value=50.0, allow_nan=False), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=8),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_window_quantile_is_the_nearest_rank_of_the_last_values(
    values: list[float], size: int, q: float
) -> None:
    """The incrementally sorted window agrees with sorting the last ``size`` values."""
    window = _Window(size)
    assert window.quantile(q) is None
    for v in values:
        window.add(v)
    last = sorted(values[-size:])
    assert window.quantile(q) == last[min(len(last) - 1, max(0, math.ceil(q * len(last)) - 1))]


def test_hedges_read_latency_against_the_predicted_length() -> None:
    """A job that writes 4× what was predicted is slow against the prediction, not the shape."""
    est = fed([(0.2 + 0.01 * n, n) for n in [10, 500, 50, 1000, 200, 800] * 10])
    worst = est.quantile(1.0)
    est.observe(0.2 + 0.01 * 800, 800, 100.0, predicted=200)
    assert est.quantile(1.0) == worst  # as usual for 800 tokens
    assert est.surprise(1.0) == pytest.approx(8.2 / 2.2, rel=0.05)  # 3.7× the 200-token guess
    est.observe(2.2, 200, 101.0)  # no prediction given: the two agree
    assert est.surprise(0.0) == pytest.approx(1.0, abs=0.05)


def test_decay_is_one_when_time_has_not_passed() -> None:
    est = fed([(1.0, 10)])
    assert est.decay(est.stamp) == 1.0
    assert est.decay(est.stamp - 5) == 1.0
    assert est.decay(est.stamp + CFG.tau_s) == pytest.approx(math.exp(-1))


def test_repr_shows_the_numbers() -> None:
    assert "samples=1" in repr(fed([(1.0, 10)]))


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
            st.integers(min_value=0, max_value=200_000),
        ),
        min_size=1,
        max_size=80,
    )
)
@example(samples=[(0.0, 8845), (174.75, 11176)])  # base a hair below 0, times a huge level
def test_prediction_is_finite_and_non_negative(samples: list[tuple[float, int]]) -> None:
    """Whatever the samples, shape and level stay usable numbers."""
    est = fed([(lat, float(n)) for lat, n in samples])
    for n in (0, 1, 1000, 128_000):
        value = est.level * est.shape(n)
        assert math.isfinite(value)
        assert value >= 0.0
    assert est.base_s >= -1e-9
    assert est.per_token_s >= 0.0
