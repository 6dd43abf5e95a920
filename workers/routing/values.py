"""Values the router hands out: choices, refusals, attempts, candidates, status."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas.errors import ErrorCode
from workers.routing.config import Work

__all__ = ["Attempt", "Candidate", "Choice", "EndpointStatus", "NoChoice", "Skip"]


@dataclass(frozen=True, slots=True)
class Choice:
    """Send the job to ``endpoint`` as ``upstream_model``."""

    endpoint: str
    model: str
    """The canonical model actually used (a fallback when the requested one had no endpoint)."""
    upstream_model: str
    predicted_s: float
    """Predicted latency, failures included, before the load factor."""


@dataclass(frozen=True, slots=True)
class NoChoice:
    """No endpoint can take the job now."""

    code: ErrorCode
    """UNKNOWN_MODEL, NO_HEALTHY_ENDPOINT (health) or OVER_CAPACITY (limits, cooldowns)."""
    reason: str
    retry_at: float | None
    """Earliest time something becomes usable by itself (cooldown end, half-open,
    bucket refill), on the caller's clock; None when only a completion frees one."""
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
    """Tokens reserved in the tpm bucket (prompt + output cap)."""
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
        """A capacity reason (frees up with time or completions), not a health one."""
        return self in (Skip.COOLDOWN, Skip.BUSY, Skip.RATE_LIMIT, Skip.COLD_PROBE)


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
