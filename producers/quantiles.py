"""Small statistics shared by the CLI commands' summaries."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["nearest_rank"]


def nearest_rank(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0–1) of ``values`` by nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
