"""Capacity limits of one endpoint: rpm/tpm buckets, learned concurrency, 429 cooldown.

All are driven by the caller's clock: buckets refill continuously from the
``now`` they are given, never from a timer.
"""

from __future__ import annotations

from workers.routing.config import RoutingConfig

__all__ = ["AimdLimit", "Cooldown", "TokenBucket"]


class TokenBucket:
    """A per-minute allowance (requests or tokens), refilled continuously.

    A job needing more than the whole allowance (a 50k-token prompt against a
    40k tpm limit) waits for a full bucket instead of waiting forever.
    """

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = self.capacity
        self.stamp = float("-inf")
        """When ``tokens`` was last brought up to date."""

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.1f}/{self.capacity:.0f}>"

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def can_take(self, need: float, now: float) -> bool:
        """Whether ``need`` is available now. Read-only: this runs on every pick."""
        # min(cap, tokens + refill) >= need <=> tokens + refill >= need, since need <= cap.
        need = need if need < self.capacity else self.capacity
        return self.tokens + (now - self.stamp) * self.rate >= need

    def take(self, need: float, now: float) -> None:
        """Reserve ``need``; may go into debt when the caller did not check first."""
        self._refill(now)
        self.tokens -= min(need, self.capacity)

    def give(self, amount: float) -> None:
        """Return an unused part of a reservation."""
        self.tokens = min(self.capacity, self.tokens + max(amount, 0.0))

    def ready_at(self, need: float, now: float) -> float:
        """When ``need`` can be taken, if nothing else takes from the bucket."""
        self._refill(now)
        deficit = min(need, self.capacity) - self.tokens
        return now if deficit <= 0 else now + deficit / self.rate


class AimdLimit:
    """Concurrency the endpoint tolerates, learned from 429s.

    Starts at the configured ``max_concurrency`` and never exceeds it. A 429
    that arrives while ``k ≥ 2`` requests were in flight says the endpoint
    took ``k − 1`` and refused the ``k``-th — if it was about concurrency.
    It was not when a request recently *succeeded* with ``k`` or more in
    flight (``proven``): that 429 is a shed or a rate limit, and only lowers
    ``proven`` by one (so a capacity that shrinks is learned after a few), and
    :meth:`on_rate_limited` returns False for the caller to treat it as one.
    Otherwise the limit drops toward ``k − 1``, by at most a factor
    ``backoff`` per 429 (TCP: halve), always by at least 1, never below 1: a
    real limit is found in a few 429s instead of the dozens a ×0.9 cut takes.
    Growth is additive per window (TCP Reno: ``+1/limit`` per success while at
    least half the limit is in use), so probing above a learned limit costs
    about one 429 per ``limit`` successes.
    """

    __slots__ = ("_backoff", "ceiling", "limit", "proven", "value")

    def __init__(self, ceiling: int, backoff: float) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.value = ceiling
        """The limit as a whole number of requests (an attribute: read on every pick)."""
        self.proven = 0
        """Most requests in flight (the one answered included) at a recent success."""
        self._backoff = backoff

    def __repr__(self) -> str:
        return f"<AimdLimit {self.value}/{self.ceiling} proven={self.proven}>"

    def on_rate_limited(self, in_flight: int) -> bool:
        """A 429 with ``in_flight`` requests out, this one included; True if a concurrency limit."""
        if in_flight <= self.proven:
            self.proven -= 1
            return False
        cut = max(float(in_flight - 1), self.limit * self._backoff)
        self.limit = max(1.0, min(self.limit - 1.0, cut))
        self.value = max(1, int(self.limit))
        return True

    def on_success(self, in_flight: int) -> None:
        if in_flight > self.proven:
            self.proven = in_flight
        if in_flight * 2 >= self.limit and self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)
            self.value = max(1, int(self.limit))


class Cooldown:
    """Time out after repeated 429s (or a 503 that says when to come back).

    Only 429s that are not a concurrency limit count here (nothing else in
    flight, or as many in flight as recently succeeded: see :class:`AimdLimit`),
    and only from the ``cooldown_after``-th in a row
    without a success between: a lone 429 is as often load shedding as a rate
    limit, and costs one fast round trip, while cooling the endpoint down
    costs every job its latency for a second or more. ``Retry-After`` is
    honoured up to ``retry_after_cap_s`` and stretched by ×U[1, 1 + cooldown_jitter]
    (Envoy: ×U[1, 1.5]) so that workers told the same value do not come back
    together. Without a value, the wait starts at ``cooldown_default_s`` and
    doubles per further 429, up to ``cooldown_default_cap_s``; a success resets
    the streak.
    """

    __slots__ = ("_after", "_cap", "_default", "_default_cap", "_jitter", "streak", "until")

    def __init__(self, config: RoutingConfig) -> None:
        self._after = config.cooldown_after
        self._cap = config.retry_after_cap_s
        self._jitter = config.cooldown_jitter
        self._default = config.cooldown_default_s
        self._default_cap = config.cooldown_default_cap_s
        self.streak = 0
        self.until = 0.0

    def __repr__(self) -> str:
        return f"<Cooldown until={self.until:.3f} streak={self.streak}>"

    def rate_limited(self, now: float, retry_after_s: float | None, jitter: float) -> None:
        """A 429 with nothing else in flight."""
        self.streak += 1
        if self.streak < self._after:
            return
        if retry_after_s is None:
            doublings = min(self.streak - self._after, 60)
            retry_after_s = min(self._default * 2.0**doublings, self._default_cap)
        self.hold(now, retry_after_s, jitter)

    def hold(self, now: float, retry_after_s: float, jitter: float) -> None:
        """Cool down for ``retry_after_s`` (capped, jittered by ``jitter`` in [0, 1))."""
        wait = min(max(retry_after_s, 0.0), self._cap)
        self.until = max(self.until, now + wait * (1.0 + self._jitter * jitter))
