"""Endpoint health: how often it fails, what a failure costs, whether it is ejected.

Two mechanisms with different jobs:

* :class:`FailureStats` feeds the *cost* of an endpoint. A failure costs what
  it really costs — its elapsed time (a fast 5xx ~ its own latency, a hang
  ~ the whole timeout) — weighted by the failure rate. An endpoint with
  occasional fast errors stays attractive; one that hangs does not.
* :class:`Unusable` marks (endpoint, model) pairs answered with 401/403/404:
  a configuration problem, so out for ``auth_unusable_s``, other models unaffected.
* :class:`Circuit` is for endpoints that are really down (Envoy outlier
  detection, Finagle FailureAccrual): eject after ``eject_after`` consecutive
  failures or a failure rate ≥ ``eject_failure_rate`` over ≥ ``eject_min_calls``
  recent calls, for ``eject_base_s · 2^(k−1)`` (cap ``eject_max_s``, ±jitter)
  where k counts recent ejections; then half-open: exactly one probe; its
  success closes the circuit, its failure ejects again for longer.
"""

from __future__ import annotations

from enum import StrEnum
from math import exp

from workers.routing.config import RoutingConfig

__all__ = ["ALL_MODELS", "Circuit", "CircuitState", "FailureStats", "Unusable"]

ALL_MODELS = "*"
"""Key of an unusable-mark that applies to every model of the endpoint."""


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class FailureStats:
    """Time-decayed failure rate and EWMA failure cost of one endpoint.

    Outcome counts fade with ``failure_tau_s`` (a ~30 s window at any traffic
    level); ``failure_prior_calls`` pseudo-successes keep one early failure
    from reading as a 100% failure rate.
    """

    __slots__ = ("_alpha", "_prior", "_tau", "calls", "cost_s", "failures", "stamp", "total")

    def __init__(self, config: RoutingConfig) -> None:
        self._tau = config.failure_tau_s
        self._prior = config.failure_prior_calls
        self._alpha = 1.0 / config.failure_cost_window
        self.calls = 0.0
        self.failures = 0.0
        self.cost_s = 0.0
        self.stamp = 0.0
        self.total = 0

    def __repr__(self) -> str:
        return f"<FailureStats rate={self.rate:.3f} cost={self.cost_s:.3g}s calls={self.calls:.1f}>"

    @property
    def rate(self) -> float:
        """Failure probability for cost purposes (shrunk toward 0 on little evidence)."""
        return self.failures / (self.calls + self._prior) if self.calls else 0.0

    @property
    def raw_rate(self) -> float:
        """Failures / calls in the recent window, for the ejection rule."""
        return self.failures / self.calls if self.calls else 0.0

    def decay(self, now: float) -> float:
        """Weight left to the recorded outcomes after ``now − stamp`` seconds."""
        return exp(-(now - self.stamp) / self._tau) if now > self.stamp else 1.0

    def observe(self, now: float, *, failed: bool, elapsed_s: float = 0.0) -> None:
        """Record one outcome; a failure also updates the cost of failing."""
        w = self.decay(now)
        self.calls = self.calls * w + 1.0
        self.failures = self.failures * w + (1.0 if failed else 0.0)
        self.stamp = max(self.stamp, now)
        if failed:
            elapsed = max(elapsed_s, 0.0)
            first = self.total == 0
            self.cost_s = elapsed if first else self.cost_s + self._alpha * (elapsed - self.cost_s)
            self.total += 1

    def reset(self) -> None:
        """Forget the rate (a closed circuit starts afresh); keep the cost."""
        self.calls = self.failures = 0.0


class Circuit:
    """Closed → open (ejected) → half-open (one probe) → closed."""

    __slots__ = (
        "_after",
        "_base",
        "_closed_at",
        "_jitter",
        "_max",
        "_max_rate",
        "_min_calls",
        "consecutive",
        "ejections",
        "open_until",
        "probing",
        "streak",
    )

    def __init__(self, config: RoutingConfig) -> None:
        self._base = config.eject_base_s
        self._max = config.eject_max_s
        self._jitter = config.eject_jitter
        self._after = config.eject_after
        self._min_calls = config.eject_min_calls
        self._max_rate = config.eject_failure_rate
        self.open_until: float | None = None
        self.probing = False
        self.consecutive = 0
        self.ejections = 0
        """Ejections since start (for status)."""
        self.streak = 0
        """Recent ejections: the exponent of the next ejection time."""
        self._closed_at: float | None = None

    def __repr__(self) -> str:
        until = "" if self.open_until is None else f" until={self.open_until:.3f}"
        return (
            f"<Circuit consecutive={self.consecutive} ejections={self.ejections}"
            f" streak={self.streak} probing={self.probing}{until}>"
        )

    def state(self, now: float) -> CircuitState:
        if self.open_until is None:
            return CircuitState.CLOSED
        return CircuitState.OPEN if now < self.open_until else CircuitState.HALF_OPEN

    def on_begin(self, now: float) -> bool:
        """An attempt starts; True when it is the half-open probe."""
        if self.open_until is not None and now >= self.open_until and not self.probing:
            self.probing = True
            return True
        return False

    def on_cancel(self, probe: bool) -> None:
        if probe:
            self.probing = False

    def on_success(self, now: float, probe: bool) -> bool:
        """A success; True when it closed the circuit."""
        self.consecutive = 0
        # Successes of attempts begun before the ejection say little: only the
        # probe, or any success once the ejection time is over, closes.
        if self.open_until is not None and (probe or now >= self.open_until):
            self.open_until = None
            self.probing = False
            self._closed_at = now
            return True
        return False

    def on_failure(self, now: float, *, probe: bool, jitter: float, stats: FailureStats) -> bool:
        """An endpoint failure (already in ``stats``); True when it ejected the endpoint."""
        self.consecutive += 1
        if self.open_until is not None:
            if probe:
                self.probing = False
                self.eject(now, jitter)
                return True
            return False
        if self.consecutive >= self._after or (
            stats.calls >= self._min_calls and stats.raw_rate >= self._max_rate
        ):
            self.eject(now, jitter)
            return True
        return False

    def hold(self, until: float) -> None:
        """Stay open until at least ``until`` (another worker's ejection)."""
        if self.open_until is None or self.open_until < until:
            self.open_until = until
            self.probing = False

    def eject(self, now: float, jitter: float) -> float:
        """Open the circuit; ``jitter`` in [0, 1) spreads workers apart. Returns the duration."""
        if self._closed_at is not None and self._max > 0:
            # Envoy lets the multiplier decay while healthy: one step per
            # eject_max_s spent closed, so an old incident does not double today's.
            healthy = int((now - self._closed_at) // self._max)
            self.streak = max(0, self.streak - healthy)
        self.streak += 1
        self.ejections += 1
        self.consecutive = 0
        base = self._base * 2.0 ** min(self.streak - 1, 60)
        spread = 1.0 + self._jitter * (2.0 * jitter - 1.0)
        duration = min(base, self._max) * spread
        self.open_until = now + duration
        self.probing = False
        return duration


class Unusable:
    """Models an endpoint refused (401/403/404), each until a time."""

    __slots__ = ("_marks",)

    def __init__(self) -> None:
        self._marks: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<Unusable {self._marks}>"

    def __bool__(self) -> bool:
        return bool(self._marks)

    def mark(self, model: str | None, until: float) -> None:
        """``model`` None marks every model (the attempt did not say which)."""
        self._marks[model if model is not None else ALL_MODELS] = until

    def until(self, model: str, now: float) -> float | None:
        """When ``model`` becomes usable again, or None if it is usable now."""
        for key in (model, ALL_MODELS):
            until = self._marks.get(key)
            if until is not None:
                if now < until:
                    return until
                del self._marks[key]  # expired
        return None

    def models(self, now: float) -> tuple[str, ...]:
        return tuple(sorted(k for k, t in self._marks.items() if t > now))
