"""Values the router hands out: choices, refusals, attempts, candidates, status."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas.errors import ErrorCode
from workers.routing.config import Work

__all__ = [
    "FALLBACK",
    "OVERFLOW",
    "Attempt",
    "Candidate",
    "Choice",
    "EndpointStatus",
    "NoChoice",
    "Skip",
]


@dataclass(frozen=True, slots=True)
class Choice:
    """Send the job to ``endpoint`` as ``upstream_model``."""

    endpoint: str
    model: str
    """The canonical model actually used: the requested one, a fallback or an overflow model."""
    upstream_model: str
    predicted_s: float
    """Predicted latency, failures included, before the load factor."""
    via: str | None = None
    """How ``model`` was reached: None (the requested model), ``"fallback"`` (the
    requested model had no usable endpoint) or ``"overflow"`` (it was at capacity
    and its ``overflow_to`` names this one). See :mod:`workers.routing.catalog`."""


FALLBACK = "fallback"
OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True)
class NoChoice:
    """No endpoint can take the job now."""

    code: ErrorCode
    """UNKNOWN_MODEL, NO_HEALTHY_ENDPOINT (health), UPSTREAM_REJECTED (every endpoint
    refused llmq's key or model name) or OVER_CAPACITY (limits, cooldowns: among
    them, a model that is only at capacity, whose job waits instead of falling back)."""
    reason: str
    retry_at: float | None
    """Earliest time something becomes usable by itself (cooldown end, half-open,
    room in an rpm/tpm window), on the caller's clock; None when only a completion
    frees one."""
    on_completion: bool = False
    """Some endpoint is only busy (full, or a cold probe out): a running attempt
    ending frees it, possibly long before ``retry_at``."""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request in flight at one endpoint; hand it back to succeed/fail/cancel."""

    id: int
    endpoint: str
    model: str | None
    work: Work
    started: float
    tokens: float
    """Output tokens predicted at the start, used when the reply has no usage."""
    reserved: float
    """Tokens counted in the tpm window (prompt + output cap)."""
    probe: bool
    """The single half-open probe of an ejected endpoint."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint as the router saw it for one job (for the debug line)."""

    name: str
    model: str
    predicted_s: float
    cost: float
    skip: str | None
    """Why it was not eligible, or None."""


class Skip(StrEnum):
    """Why an endpoint was not eligible for a pick."""

    EXCLUDED = "excluded"
    UNUSABLE = "unusable"
    EJECTED = "ejected"
    PROBING = "probing"
    COLD_PROBE = "cold_probe"
    COOLDOWN = "cooldown"
    BUSY = "busy"
    RATE_LIMIT = "rate_limit"

    @property
    def capacity(self) -> bool:
        """A capacity reason (frees up with time or completions), not a health one:
        a job nothing can take for these waits (``NoChoice`` code OVER_CAPACITY)."""
        return self in (Skip.COOLDOWN, Skip.BUSY, Skip.RATE_LIMIT, Skip.COLD_PROBE)

    @property
    def full(self) -> bool:
        """The endpoint is usable but at capacity: full, out of rpm/tpm for now, or
        its cold probe out. A model with such an endpoint is waited for, not left for
        its fallbacks. COOLDOWN is not among these: an endpoint cooling down after
        repeated 429s is the provider pushing back for seconds to minutes, as good as
        down for the job, so it counts as unusable and fallbacks are tried."""
        return self in (Skip.BUSY, Skip.RATE_LIMIT, Skip.COLD_PROBE)


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """Health as data, for status lines, metrics and the demo table."""

    name: str
    state: str
    """closed, open, half_open, cooldown or unusable (first that applies, in reverse)."""
    in_flight: int
    capacity: int
    max_concurrency: int
    predicted_s: float | None
    level: float
    base_s: float
    per_token_s: float
    samples: int
    failure_rate: float
    failure_cost_s: float
    consecutive_failures: int
    ejections: int
    attempts: int
    successes: int
    failures: int
    rate_limited: int
    cancelled: int
    available_at: float | None
    """When an open circuit half-opens or a cooldown ends."""
    unusable_models: tuple[str, ...]
