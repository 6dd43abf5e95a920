"""What a request gets: pure functions of (endpoint, random draws, fleet time).

The server asks :func:`plan_request` for a :class:`Plan` and only then does
the I/O, so what request #n receives under a seed can be tested without a
socket. Every request takes the same four draws whatever its outcome, so a
window that changes one rate does not shift the outcomes of later requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum

from workers.fleet.scenario import Endpoint, Latency, Window

__all__ = [
    "Effective",
    "Outcome",
    "Plan",
    "effective",
    "is_down",
    "latency_s",
    "next_change",
    "plan_request",
    "window_active",
]

_Z99 = 2.3263478740408408
"""The standard normal's 99th percentile: p99 = median * exp(sigma * _Z99)."""


class Outcome(StrEnum):
    """How the endpoint answers one request."""

    OK = "ok"
    RATE_LIMITED = "rate_limited"
    HANG = "hang"
    ERROR = "error"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class Effective:
    """An endpoint's parameters at one instant, window overrides applied."""

    latency_x: float
    down: bool
    rate_limit_rate: float
    hang_rate: float
    error_rate: float
    malformed_rate: float
    no_usage_rate: float
    stream_cut_rate: float


@dataclass(frozen=True, slots=True)
class Plan:
    """The answer to one request, decided at its arrival."""

    outcome: Outcome
    delay_s: float
    """Time before the first byte: latency, plus per-token time when a body is made."""
    completion_tokens: int
    finish_reason: str
    usage: bool
    latency_s: float
    """The latency alone: a stream's time to its first byte."""
    token_s: float
    """The mean gap between a stream's tokens."""
    stream_cut_rate: float
    stream_seed: int | None
    """A stream's own generator seed (:func:`workers.fleet.stream.pace`); None
    for a request that does not stream."""


def window_active(window: Window, t: float) -> bool:
    """Whether ``window`` covers fleet time ``t`` (start inclusive, end exclusive)."""
    if t < window.start_s:
        return False
    if window.every_s is None:
        return t < window.end_s
    return (t - window.start_s) % window.every_s < window.end_s - window.start_s


def effective(endpoint: Endpoint, t: float) -> Effective:
    """The endpoint's parameters at ``t``; later windows win where windows overlap.

    ``latency_x`` multiplies across overlapping windows and ``down`` holds if
    any active window says so.
    """
    if not endpoint.windows:  # the hot path of most endpoints
        return Effective(
            latency_x=1.0,
            down=False,
            rate_limit_rate=endpoint.rate_limit_rate,
            hang_rate=endpoint.hang_rate,
            error_rate=endpoint.error_rate,
            malformed_rate=endpoint.malformed_rate,
            no_usage_rate=endpoint.no_usage_rate,
            stream_cut_rate=endpoint.stream_cut_rate,
        )
    latency_x, down = 1.0, False
    rates = {
        "rate_limit_rate": endpoint.rate_limit_rate,
        "hang_rate": endpoint.hang_rate,
        "error_rate": endpoint.error_rate,
        "malformed_rate": endpoint.malformed_rate,
        "no_usage_rate": endpoint.no_usage_rate,
        "stream_cut_rate": endpoint.stream_cut_rate,
    }
    for window in endpoint.windows:
        if not window_active(window, t):
            continue
        latency_x *= window.latency_x
        down = down or window.down
        for field in rates:
            value = getattr(window, field)
            if value is not None:
                rates[field] = value
    return Effective(latency_x=latency_x, down=down, **rates)


def is_down(endpoint: Endpoint, t: float) -> bool:
    """Whether a ``down`` window refuses connections at ``t``."""
    return any(w.down and window_active(w, t) for w in endpoint.windows)


def next_change(endpoint: Endpoint, t: float) -> float | None:
    """The first fleet time after ``t`` at which a ``down`` window opens or closes."""
    candidates: list[float] = []
    for w in endpoint.windows:
        if not w.down:
            continue
        if w.every_s is None or t < w.start_s:
            candidates.extend(b for b in (w.start_s, w.end_s) if b > t)
            continue
        period_start = w.start_s + math.floor((t - w.start_s) / w.every_s) * w.every_s
        span = w.end_s - w.start_s
        candidates.extend(b for b in (period_start + span, period_start + w.every_s) if b > t)
    return min(candidates, default=None)


def latency_s(latency: Latency, z: float) -> float:
    """Seconds to first byte for a standard normal draw ``z``."""
    if latency.p99 <= latency.median:
        return latency.median / 1000.0
    sigma = math.log(latency.p99 / latency.median) / _Z99
    return latency.median * math.exp(sigma * z) / 1000.0


def plan_request(
    endpoint: Endpoint,
    rng: random.Random,
    t: float,
    max_tokens: int | None = None,
    *,
    input_tokens: int | None = None,
    stream: bool = False,
) -> Plan:
    """Decide the answer to the next request arriving at fleet time ``t``.

    Draws, always in this order: the outcome, the latency, the length, the
    usage, and for a ``stream`` a seed for the stream's own draws (its cut
    and token gaps), so a request that does not stream takes the same draws
    as before streams existed.
    Outcomes split [0, 1) in the order rate limit, hang, error, malformed, ok.
    With ``input_tokens`` (an embeddings request) nothing is generated: the
    time grows with the input (``ms_per_input_token``) and the length is 0.
    """
    u_outcome = rng.random()
    z = rng.normalvariate(0.0, 1.0)
    tokens = rng.randint(endpoint.output_tokens.min, endpoint.output_tokens.max)
    u_usage = rng.random()
    stream_seed = rng.getrandbits(64) if stream else None

    now = effective(endpoint, t)
    outcome = Outcome.OK
    edge = 0.0
    for rate, candidate in (
        (now.rate_limit_rate, Outcome.RATE_LIMITED),
        (now.hang_rate, Outcome.HANG),
        (now.error_rate, Outcome.ERROR),
        (now.malformed_rate, Outcome.MALFORMED),
    ):
        edge += rate
        if u_outcome < edge:
            outcome = candidate
            break

    finish_reason = "stop"
    if max_tokens is not None and tokens > max_tokens:
        tokens, finish_reason = max_tokens, "length"
    latency = delay = latency_s(endpoint.latency_ms, z)
    answered = outcome in (Outcome.OK, Outcome.MALFORMED)
    if input_tokens is not None:
        tokens = 0
        if answered:
            delay += input_tokens * endpoint.ms_per_input_token / 1000.0
    elif answered:
        delay += tokens * endpoint.ms_per_token / 1000.0
    if outcome is Outcome.RATE_LIMITED:
        delay = 0.0
    return Plan(
        outcome=outcome,
        delay_s=delay * now.latency_x,
        completion_tokens=tokens,
        finish_reason=finish_reason,
        usage=u_usage >= now.no_usage_rate,
        latency_s=0.0 if outcome is Outcome.RATE_LIMITED else latency * now.latency_x,
        token_s=endpoint.ms_per_token / 1000.0 * now.latency_x,
        stream_cut_rate=now.stream_cut_rate,
        stream_seed=stream_seed,
    )
