"""Full-jitter exponential backoff (Brooker, AWS Architecture Blog 2015)."""

from __future__ import annotations

__all__ = ["backoff"]

_MAX_EXPONENT = 60
"""2**60 · any sane base is far beyond any cap, and still a finite float."""


def backoff(
    attempt: int, *, rand: float, base_s: float = 0.5, cap_s: float = 8.0, remaining_s: float
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0 = the first retry).

    ``U(0, min(cap, base · 2^attempt))`` with ``rand`` as the uniform draw,
    truncated to ``remaining_s`` (the time left before the deadline).
    Never negative, never raises, for any attempt number.

    Args:
        attempt: retries already backed off for; negative counts as 0.
        rand: a draw from [0, 1); clamped into [0, 1].
        base_s: the first ceiling.
        cap_s: the largest ceiling.
        remaining_s: time left; the result never exceeds it.
    """
    exponent = min(max(attempt, 0), _MAX_EXPONENT)
    ceiling = max(min(cap_s, base_s * 2.0**exponent), 0.0)
    delay = min(max(rand, 0.0), 1.0) * ceiling
    return max(min(delay, remaining_s), 0.0)
