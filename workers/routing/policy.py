"""How one endpoint is chosen among the eligible ones, given their costs.

The router computes a cost per eligible endpoint (see
:mod:`workers.routing.endpoint`); a policy only picks an index. Keeping this
interface tiny lets the routing benchmark compare policies on equal terms.

* :class:`LatencyPolicy` (default): the lowest cost, ties broken at random.
  With a fresh in-flight term in the cost, the herding of "arg-min on stale
  averages" does not happen: a dispatched job raises its endpoint's cost at once.
* :class:`P2CPolicy`: the cheaper of two distinct random endpoints
  (Mitzenmacher); for very large fleets or many workers sharing endpoints.
* :class:`RoundRobinPolicy`, :class:`RandomPolicy`: baselines for benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["LatencyPolicy", "P2CPolicy", "Policy", "RandomPolicy", "RoundRobinPolicy"]


class Policy(Protocol):
    """Chooses an index into ``costs`` (never empty); ``rand()`` is in [0, 1)."""

    @property
    def name(self) -> str: ...

    def choose(self, costs: Sequence[float], rand: Callable[[], float]) -> int: ...


def _index(rand: Callable[[], float], n: int) -> int:
    # min(): a rand() that returns exactly 1.0 must not index past the end.
    return min(int(rand() * n), n - 1)


class LatencyPolicy:
    """Lowest cost; equal costs (e.g. several cold endpoints) share picks at random."""

    name = "latency"

    def choose(self, costs: Sequence[float], rand: Callable[[], float]) -> int:
        # min/index/count run in C: three passes beat one Python loop.
        best_cost = min(costs)
        best = costs.index(best_cost)
        ties = costs.count(best_cost)
        if ties == 1:
            return best
        # Equal costs (several cold endpoints, say) share the picks uniformly.
        for _ in range(_index(rand, ties)):
            best = costs.index(best_cost, best + 1)
        return best


class P2CPolicy:
    """Power of two choices over the same costs."""

    name = "p2c"

    def choose(self, costs: Sequence[float], rand: Callable[[], float]) -> int:
        n = len(costs)
        if n == 1:
            return 0
        a = _index(rand, n)
        b = _index(rand, n - 1)
        if b >= a:
            b += 1  # two distinct endpoints
        return b if costs[b] < costs[a] else a


class RoundRobinPolicy:
    """Each eligible endpoint in turn, costs ignored."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, costs: Sequence[float], rand: Callable[[], float]) -> int:
        i = self._next % len(costs)
        self._next = i + 1
        return i


class RandomPolicy:
    """Uniformly at random, costs ignored."""

    name = "random"

    def choose(self, costs: Sequence[float], rand: Callable[[], float]) -> int:
        return _index(rand, len(costs))
