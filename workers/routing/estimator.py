"""Predicted latency of one endpoint for a given amount of work.

An LLM call's end-to-end time is roughly ``base + per_token · output_tokens``
(NVIDIA NIM: e2e ≈ TTFT + N_out · TPOT). Finagle's Peak-EWMA of raw latency
would make an endpoint that happens to serve long generations look slow, so
the estimate is split in two:

* the **shape** ``base_s + per_token_s · n``: a least-squares line through
  the last ~``fit_window`` samples (count-weighted, old samples fade by a
  constant factor per sample). The shape is a property of the model and the
  hardware and moves slowly. When the samples barely differ in length the
  slope cannot be measured, so a ridge term pulls it toward the prior shape
  (``prior_base_s``, ``prior_per_token_s``) scaled to the observed mean.
* the **level**: a Peak-EWMA (Finagle's rule, decay time ``tau_s``) of the
  ratio ``latency / shape(n)`` — how slow the endpoint is *now* compared with
  its usual self. A slow sample is adopted at once; faster ones pull the level
  down with weight ``1 − exp(−Δt/τ)``.

The prediction for a job is ``level · shape(n)``. Idle decay (the level
falling toward 0 while nothing is in flight, so idle endpoints get re-probed)
is applied by :class:`~workers.routing.endpoint.EndpointState`, which knows
the in-flight count; this class only stores and updates.

The last ``latency_window`` ratios are kept for percentiles (hedge delay,
attempt timeout): a percentile of the ratio times the shape for *this* job's
length is a percentile of latency normalised by work.
"""

from __future__ import annotations

from math import ceil, exp

from workers.routing.config import RoutingConfig

__all__ = ["LatencyEstimator"]

_TINY = 1e-9


class LatencyEstimator:
    """Shape (base + per-token) and Peak-EWMA level of one endpoint's latency."""

    __slots__ = (
        "_keep",
        "_kp_base",
        "_kp_tok",
        "_n",
        "_nn",
        "_ny",
        "_ratios",
        "_ridge",
        "_slot",
        "_tau",
        "_w",
        "_y",
        "base_s",
        "level",
        "per_token_s",
        "samples",
        "stamp",
    )

    def __init__(self, config: RoutingConfig) -> None:
        self._tau = config.tau_s
        self._keep = 1.0 - 1.0 / config.fit_window
        self._ridge = config.ridge_tokens * config.ridge_tokens
        self._kp_base = config.prior_base_s
        self._kp_tok = config.prior_per_token_s
        self._ratios: list[float] = [1.0] * config.latency_window
        self._slot = 0
        # Weighted sums for the line fit: Σw, Σw·n, Σw·n², Σw·y, Σw·n·y.
        self._w = self._n = self._nn = self._y = self._ny = 0.0
        self.samples = 0
        self.base_s = config.prior_base_s
        self.per_token_s = config.prior_per_token_s
        self.level = 1.0
        self.stamp = 0.0

    def __repr__(self) -> str:
        return (
            f"<LatencyEstimator samples={self.samples} level={self.level:.3g}"
            f" base={self.base_s:.4g}s per_token={self.per_token_s:.4g}s>"
        )

    def shape(self, tokens: float) -> float:
        """Usual latency for ``tokens`` output tokens, before the level."""
        return self.base_s + self.per_token_s * tokens

    def decay(self, now: float) -> float:
        """Weight left to the level after idling since the last sample."""
        return exp(-(now - self.stamp) / self._tau) if now > self.stamp else 1.0

    def observe(self, latency_s: float, tokens: float, now: float) -> None:
        """Fold in one successful attempt's latency and its output length."""
        y = max(latency_s, _TINY)
        n = max(tokens, 0.0)
        if self.samples == 0:
            ratio = 1.0
            self.level = 1.0
        else:
            ratio = y / max(self.shape(n), _TINY)
            w = self.decay(now)
            # Peak-EWMA: a spike is believed at once, recovery takes ~τ.
            self.level = ratio if ratio > self.level else self.level * w + ratio * (1.0 - w)
        self.stamp = max(self.stamp, now)
        self._ratios[self._slot] = ratio
        self._slot = (self._slot + 1) % len(self._ratios)
        self.samples += 1
        self._fit(n, y)

    def _fit(self, n: float, y: float) -> None:
        k = self._keep
        self._w = self._w * k + 1.0
        self._n = self._n * k + n
        self._nn = self._nn * k + n * n
        self._y = self._y * k + y
        self._ny = self._ny * k + n * y
        mean_n = self._n / self._w
        mean_y = self._y / self._w
        var = max(self._nn / self._w - mean_n * mean_n, 0.0)
        cov = self._ny / self._w - mean_n * mean_y
        # The prior's slope, rescaled so that the prior line passes through the mean.
        prior_at_mean = self._kp_base + self._kp_tok * mean_n
        prior_slope = mean_y * self._kp_tok / prior_at_mean if prior_at_mean > 0 else 0.0
        denom = var + self._ridge
        slope = (cov + self._ridge * prior_slope) / denom if denom > 0 else prior_slope
        slope = max(slope, 0.0)
        if mean_n > 0:
            slope = min(slope, mean_y / mean_n)  # keeps the base >= 0
        self.per_token_s = slope
        # Clamped: rounding leaves it a hair below 0, which a large level magnifies.
        self.base_s = max(0.0, mean_y - slope * mean_n)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of recent latency ratios (nearest rank); None without samples."""
        held = min(self.samples, len(self._ratios))
        if held == 0:
            return None
        ordered = sorted(self._ratios[:held])
        return ordered[min(held - 1, max(0, ceil(q * held) - 1))]
