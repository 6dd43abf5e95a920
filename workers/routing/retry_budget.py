"""A process-wide retry budget (Finagle ``RetryBudget``), so an outage never becomes a storm.

Every job deposits ``ratio`` (0.2) when it starts; every retry or hedge
withdraws 1. Deposits and withdrawals expire after ``ttl_s`` (10 s), and a
constant reserve of ``min_per_s · ttl_s`` lets a quiet worker still retry
(Finagle: 10/s). Over any ``ttl_s`` window, retries ≤ ratio · jobs + the reserve,
however many attempts each job is allowed.

Call ``record_request`` once per job (not per attempt) and ``try_spend`` before
each retry or hedge.

Priority: a batch job's retry or hedge may not draw the balance below
``batch_keep`` of the reserve, which is kept for interactive jobs.

Fleet-wide: the ratio part adds up across workers by itself (each deposits
for its own jobs); the constant reserve would multiply with the replicas, so
each worker holds its share of it (:meth:`share`, ``1/N`` of ``min_per_s``
with N live workers).
"""

from __future__ import annotations

from workers.routing.config import RoutingConfig

__all__ = ["RetryBudget"]

_SLOTS = 10
_UNIT = 1000
"""Integer milli-retries, as Finagle does: 5 × 0.2 must make exactly one retry."""


class RetryBudget:
    """Leaky token bucket over ``ttl_s`` in ten slots, refreshed by the caller's clock."""

    __slots__ = (
        "_at",
        "_batch_keep",
        "_deposit",
        "_full_reserve",
        "_keep",
        "_ratio",
        "_reserve",
        "_slots",
        "_width",
    )

    def __init__(
        self, ratio: float, min_per_s: float, ttl_s: float = 10.0, *, batch_keep: float = 0.5
    ) -> None:
        if ratio < 0 or min_per_s < 0 or ttl_s <= 0 or not 0 <= batch_keep <= 1:
            raise ValueError(
                "RetryBudget needs ratio >= 0, min_per_s >= 0, ttl_s > 0 and batch_keep in [0, 1]"
            )
        self._ratio = ratio
        self._deposit = round(ratio * _UNIT)
        self._full_reserve = min_per_s * ttl_s * _UNIT
        self._batch_keep = batch_keep
        self._reserve = self._keep = 0
        self.share(1.0)
        self._width = ttl_s / _SLOTS
        self._slots = [0] * _SLOTS
        self._at: int | None = None

    @classmethod
    def from_config(cls, config: RoutingConfig) -> RetryBudget:
        """The budget with ``budget_ratio``, ``budget_min_per_s`` and ``budget_ttl_s``."""
        return cls(
            config.budget_ratio,
            config.budget_min_per_s,
            config.budget_ttl_s,
            batch_keep=config.batch_budget_share,
        )

    def share(self, fraction: float) -> None:
        """Hold ``fraction`` of the constant reserve (this worker's share of the fleet's)."""
        self._reserve = round(self._full_reserve * max(0.0, min(fraction, 1.0)))
        self._keep = round(self._reserve * self._batch_keep)

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

    def try_spend(self, now: float, *, batch: bool = False) -> bool:
        """Withdraw one retry if the budget allows; False means don't retry."""
        slot = self._advance(now)
        kept = self._keep if batch else 0
        if self._reserve + sum(self._slots) - kept < _UNIT:
            return False
        self._slots[slot] -= _UNIT
        return True
