"""A process-wide retry budget (Finagle ``RetryBudget``), so an outage never becomes a storm.

Every job deposits ``ratio`` (0.2) when it starts; every retry or hedge
withdraws 1. Deposits and withdrawals expire after ``ttl_s`` (10 s), and a
constant reserve of ``min_per_s · ttl_s`` lets a quiet worker still retry
(Finagle: 10/s). Over any ``ttl_s`` window, retries ≤ ratio · jobs + the reserve,
however many attempts each job is allowed.

Call ``record_request`` once per job (not per attempt) and ``try_spend`` before
each retry or hedge.
"""

from __future__ import annotations

from workers.routing.config import RoutingConfig

__all__ = ["RetryBudget"]

_SLOTS = 10
_UNIT = 1000
"""Integer milli-retries, as Finagle does: 5 × 0.2 must make exactly one retry."""


class RetryBudget:
    """Leaky token bucket over ``ttl_s`` in ten slots, refreshed by the caller's clock."""

    __slots__ = ("_at", "_deposit", "_ratio", "_reserve", "_slots", "_width")

    def __init__(self, ratio: float, min_per_s: float, ttl_s: float = 10.0) -> None:
        if ratio < 0 or min_per_s < 0 or ttl_s <= 0:
            raise ValueError("RetryBudget needs ratio >= 0, min_per_s >= 0 and ttl_s > 0")
        self._ratio = ratio
        self._deposit = round(ratio * _UNIT)
        self._reserve = round(min_per_s * ttl_s * _UNIT)
        self._width = ttl_s / _SLOTS
        self._slots = [0] * _SLOTS
        self._at: int | None = None

    @classmethod
    def from_config(cls, config: RoutingConfig) -> RetryBudget:
        """The budget with ``budget_ratio``, ``budget_min_per_s`` and ``budget_ttl_s``."""
        return cls(config.budget_ratio, config.budget_min_per_s, config.budget_ttl_s)

    def __repr__(self) -> str:
        balance = (self._reserve + sum(self._slots)) / _UNIT
        return f"<RetryBudget balance={balance:.1f} ratio={self._ratio}>"

    def _advance(self, now: float) -> int:
        slot = int(now // self._width)
        if self._at is None:
            self._at = slot
        elif slot > self._at:
            # Slots that fell out of the window expire, deposits and withdrawals alike.
            for k in range(1, min(slot - self._at, _SLOTS) + 1):
                self._slots[(self._at + k) % _SLOTS] = 0
            self._at = slot
        return self._at % _SLOTS

    def balance(self, now: float) -> float:
        """Retries available now."""
        self._advance(now)
        return (self._reserve + sum(self._slots)) / _UNIT

    def record_request(self, now: float) -> None:
        """A job started: deposit ``ratio`` of a retry."""
        self._slots[self._advance(now)] += self._deposit

    def try_spend(self, now: float) -> bool:
        """Withdraw one retry if the budget allows; False means don't retry."""
        slot = self._advance(now)
        if self._reserve + sum(self._slots) < _UNIT:
            return False
        self._slots[slot] -= _UNIT
        return True
