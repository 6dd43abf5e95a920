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
  (``prior_base_s``, ``prior_per_token_s``) scaled to the observed mean. A
  sample above ``fit_clip`` × the shape enters the fit at that bound (once a
  few samples are in): a hang or a spike is the level's business, and seven
  8 s hangs among 64 samples of 0.1 s would otherwise make the "usual"
  latency 1 s for the next hundred samples. A lasting slowdown still moves
  the shape, by up to ×``fit_clip`` per window.
* the **level**: a peak-biased EWMA of the ratio ``latency / shape(n)`` —
  how slow the endpoint is *now* compared with its usual self. A slower sample
  moves the level ``level_rise`` of the way up at once; a faster one pulls it
  down with weight ``max(level_alpha, 1 − exp(−Δt/τ))``.

  Finagle's Peak-EWMA adopts every slower sample whole and weighs the others
  by time alone. At real request rates (a sample every ~20 ms, τ = 10 s) that
  makes the level the largest ratio of the last ~τ: the endpoint's p99.5,
  2.5–3× its typical, so the busiest endpoint looks slowest and traffic leaks
  to endpoints that are slower in truth. The per-sample floor on the weight
  and the partial rise keep the level near the typical ratio while a real
  slowdown (×3 and more) still shows within a sample or two; the oldest
  pending request (in ``EndpointState.score``) reacts before any sample does.
* :meth:`censor`: an attempt abandoned after ``t`` seconds (a hedge loser)
  took at least ``t``; that lower bound may raise the level, so a slow
  endpoint is not retried at once because its slow attempts were cancelled.

The prediction for a job is ``level · shape(n)``. How an idle level is read
(reverting toward the endpoint's usual self, and slowly toward 0 so that
slower endpoints are re-probed now and then) is up to
:class:`~workers.routing.endpoint.EndpointState`, which knows the in-flight
count; this class only stores and updates.

The last ``latency_window`` ratios are kept, sorted as they come, for
percentiles: a percentile of the ratio times the shape for *this* job's length
is a percentile of latency normalised by work. Two windows, because the two
users know different things:

* attempt timeouts budget for the job's output cap, so they read the ratio
  to the shape of the tokens really produced (:meth:`quantile`);
* a hedge fires while the output length is still unknown, so it reads the
  ratio to the shape of the tokens *predicted* at the start
  (:meth:`surprise`). Read against the real length instead, every job that
  writes more than predicted looks late: in the routing benchmark that hedged
  13 % of jobs at a nominal p95.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from math import ceil, exp

from workers.routing.config import RoutingConfig

__all__ = ["LatencyEstimator"]

_TINY = 1e-9
_CLIP_AFTER = 5
"""Samples before the fit is clipped: the first ones replace the prior, whatever they are."""


class _Window:
    """The last ``size`` values, also kept sorted: a percentile is an index."""

    __slots__ = ("_ring", "_size", "_slot", "_sorted")

    def __init__(self, size: int) -> None:
        self._size = size
        self._ring: list[float] = []
        self._sorted: list[float] = []
        self._slot = 0

    def add(self, value: float) -> None:
        ring, ordered = self._ring, self._sorted
        if len(ring) < self._size:
            ring.append(value)
        else:
            del ordered[bisect_left(ordered, ring[self._slot])]
            ring[self._slot] = value
            self._slot = (self._slot + 1) % self._size
        insort(ordered, value)

    def quantile(self, q: float) -> float | None:
        ordered = self._sorted
        held = len(ordered)
        if held == 0:
            return None
        return ordered[min(held - 1, max(0, ceil(q * held) - 1))]


class LatencyEstimator:
    """Shape (base + per-token) and Peak-EWMA level of one endpoint's latency."""

    __slots__ = (
        "_alpha",
        "_clip",
        "_keep",
        "_kp_base",
        "_kp_tok",
        "_n",
        "_nn",
        "_ny",
        "_ratios",
        "_revert",
        "_ridge",
        "_rise",
        "_surprises",
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
        self._rise = config.level_rise
        self._alpha = config.level_alpha
        self._clip = config.fit_clip
        self._revert = config.revert_s
        self._keep = 1.0 - 1.0 / config.fit_window
        self._ridge = config.ridge_tokens * config.ridge_tokens
        self._kp_base = config.prior_base_s
        self._kp_tok = config.prior_per_token_s
        self._ratios = _Window(config.latency_window)
        self._surprises = _Window(config.latency_window)
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

    def reverted(self, at: float) -> float:
        """The level as believed at ``at`` after idling since the last sample.

        With no news a slow spell is assumed to pass: the level reverts toward
        the endpoint's usual self (1.0) with time constant ``revert_s``.
        """
        idle = at - self.stamp
        if idle <= 0:
            return self.level
        return 1.0 + (self.level - 1.0) * exp(-idle / self._revert)

    def observe(
        self,
        latency_s: float,
        tokens: float,
        now: float,
        predicted: float | None = None,
        idle_from: float | None = None,
    ) -> None:
        """Fold in one successful attempt: its latency, output length and predicted length.

        ``idle_from``: the attempt started at that time on an idle endpoint (a
        probe), so the sample updates the level believed then, not the stale one.
        """
        y = max(latency_s, _TINY)
        n = max(tokens, 0.0)
        if idle_from is not None:
            self.level = self.reverted(idle_from)
        if self.samples == 0:
            ratio = surprise = 1.0
            self.level = 1.0
        else:
            ratio = y / max(self.shape(n), _TINY)
            self._move(ratio, now)
            guess = n if predicted is None else max(predicted, 0.0)
            surprise = y / max(self.shape(guess), _TINY)
        self.stamp = max(self.stamp, now)
        self._ratios.add(ratio)
        self._surprises.add(surprise)
        if self.samples >= _CLIP_AFTER:
            y = min(y, self._clip * self.shape(n))
        self.samples += 1
        self._fit(n, y)

    def _move(self, ratio: float, now: float) -> None:
        if ratio > self.level:
            self.level += self._rise * (ratio - self.level)
        else:
            w = min(self.decay(now), 1.0 - self._alpha)
            self.level = self.level * w + ratio * (1.0 - w)

    def censor(
        self, elapsed_s: float, tokens: float, now: float, idle_from: float | None = None
    ) -> None:
        """An attempt abandoned after ``elapsed_s``: its latency was at least that."""
        if self.samples == 0:
            return
        if idle_from is not None:
            self.level = self.reverted(idle_from)
            self.stamp = max(self.stamp, idle_from)
        ratio = elapsed_s / max(self.shape(max(tokens, 0.0)), _TINY)
        if ratio > self.level:
            self.level += self._rise * (ratio - self.level)
            self.stamp = max(self.stamp, now)

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
        """The ``q`` quantile of recent latency ÷ shape(tokens produced); None without samples."""
        return self._ratios.quantile(q)

    def surprise(self, q: float) -> float | None:
        """The ``q`` quantile of recent latency ÷ shape(tokens predicted at the start)."""
        return self._surprises.quantile(q)
