"""How long an attempt may run, and when to hedge it: percentiles normalised by work.

Both read the endpoint's recent latency *ratios* (latency ÷ usual latency for
that length, see :mod:`workers.routing.estimator`) and scale a percentile by
the usual latency for *this* job, so one table serves short and long jobs.
"""

from __future__ import annotations

from workers.routing.config import RoutingConfig
from workers.routing.estimator import LatencyEstimator

__all__ = ["attempt_timeout", "default_timeout", "hedge_delay"]


def default_timeout(config: RoutingConfig, cap_tokens: float) -> float:
    """Without history: ``3600 s · max_tokens / 128 000`` in [10 s, 600 s] (Anthropic SDK)."""
    expected = config.default_timeout_per_token_s * cap_tokens
    return min(max(expected, config.default_timeout_min_s), config.default_timeout_max_s)


def attempt_timeout(
    latency: LatencyEstimator,
    config: RoutingConfig,
    *,
    cap_tokens: float,
    bound_s: float,
    remaining_s: float,
) -> float:
    """``min(remaining − margin, bound, pad · p99.9 latency at cap_tokens)``, never negative.

    The percentile needs ``timeout_min_samples`` samples; before that the
    default scales with the output cap. A floor of ``min_attempt_timeout_s``
    keeps very fast endpoints from timing out on scheduling noise. ``bound_s``
    is the endpoint's configured upper bound of one attempt.
    """
    ratio = latency.quantile(config.timeout_quantile)
    if latency.samples >= config.timeout_min_samples and ratio is not None:
        padded = config.timeout_pad * ratio * latency.shape(cap_tokens)
        timeout = max(padded, config.min_attempt_timeout_s)
    else:
        timeout = default_timeout(config, cap_tokens)
    return max(min(timeout, bound_s, remaining_s - config.deadline_margin_s), 0.0)


def hedge_delay(latency: LatencyEstimator, config: RoutingConfig, *, tokens: float) -> float | None:
    """p95 latency for a job predicted to write ``tokens`` (Dean & Barroso); None if unsure."""
    ratio = latency.surprise(config.hedge_quantile)
    if latency.samples < config.hedge_min_samples or ratio is None:
        return None
    return ratio * latency.shape(tokens)
