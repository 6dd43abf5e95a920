"""Values the router is built from: endpoints, a job's work, the tunables.

Defaults come from the routing reference (Finagle, Envoy, gRPC, the SRE
book, the Anthropic SDK); each field names its source or says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps pydantic out of the import
    from schemas.settings import EndpointSettings

__all__ = ["EndpointSpec", "ModelRules", "RoutingConfig", "Work"]


class ModelRules(Protocol):
    """What the router needs from ``schemas.settings.ModelSettings``."""

    @property
    def aliases(self) -> Sequence[str]: ...

    @property
    def fallbacks(self) -> Sequence[str]: ...

    @property
    def overflow_to(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class Work:
    """How big one job is, in tokens.

    ``output_tokens`` is the caller's cap (``max_tokens``) when it gave one.
    Predictions use ``min(cap, typical output of the model)``; timeouts and
    rate-limit reservations use the cap, because the upstream may use it all.
    """

    prompt_tokens: int
    output_tokens: int | None
    by_input: bool = False
    """Sized by its input, not its output (an embedding): predictions, timeouts and
    token reservations count ``prompt_tokens``, and the endpoint's per-token
    slope is learned per input token. An endpoint serves one kind of model, so
    its latency fit never mixes the two."""
    batch: bool = False
    """A batch-class job: it takes an endpoint slot only while interactive work
    leaves headroom, and its retries and hedges leave part of the retry budget
    to interactive jobs (see ``EndpointState.blocked`` and ``RetryBudget``)."""
    stream: bool = False
    """A streamed job: an attempt succeeds at its first token, so its timeout
    and hedge delay are read at zero output tokens (time to first token, the
    fitted shape's base); picks still weigh the whole answer (first token plus
    the output at the endpoint's token rate, the shape's slope)."""


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One upstream endpoint as the router sees it."""

    name: str
    models: Mapping[str, str]
    """Canonical model name → the name this endpoint expects."""
    max_concurrency: int
    rpm: int | None = None
    tpm: int | None = None
    timeout_s: float = 600.0
    """Upper bound of one attempt, whatever the deadline."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError(f"endpoint {self.name!r} serves no model")
        if self.max_concurrency < 1:
            raise ValueError(f"endpoint {self.name!r}: max_concurrency must be >= 1")
        if (self.rpm is not None and self.rpm < 1) or (self.tpm is not None and self.tpm < 1):
            raise ValueError(f"endpoint {self.name!r}: rpm and tpm must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError(f"endpoint {self.name!r}: timeout_s must be > 0")
        # A read-only copy: the spec is a value, callers' dicts must not leak in.
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    @classmethod
    def from_settings(cls, endpoint: EndpointSettings) -> EndpointSpec:
        """The routing view of a configured endpoint."""
        return cls(
            name=endpoint.name,
            models={name: entry.upstream for name, entry in endpoint.models.items()},
            max_concurrency=endpoint.max_concurrency,
            rpm=endpoint.rpm,
            tpm=endpoint.tpm,
            timeout_s=endpoint.timeout_s,
        )


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Every tunable of the routing core; the defaults are meant to be kept."""

    # --- latency estimate -------------------------------------------------
    tau_s: float = 10.0
    """Time weight of a faster sample when samples are sparse (Finagle/Linkerd: 10 s)."""
    level_alpha: float = 0.1
    """Least weight of a faster sample: the level forgets a slow spell in ~10 samples."""
    level_rise: float = 0.5
    """Share of a slower sample's excess adopted at once (Finagle's Peak-EWMA: all of it)."""
    revert_s: float = 1.0
    """An idle endpoint's level reverts toward its usual self (1.0) with this time constant."""
    explore_s: float = 60.0
    """...and fades toward 0 with this one, so slower endpoints get a probe now and then."""
    fit_window: int = 64
    """Samples behind the base/per-token fit; the shape of latency changes slowly."""
    fit_clip: float = 3.0
    """A sample enters the fit at most at this multiple of the shape (spikes are the level's)."""
    ridge_tokens: float = 16.0
    """Below this spread of output lengths the per-token slope follows the prior."""
    prior_base_s: float = 0.5
    prior_per_token_s: float = 0.02
    """Prior latency shape (50 tokens/s): used before an endpoint has history."""
    default_output_tokens: int = 256
    """Predicted output length when neither the job nor history says."""
    default_max_tokens: int = 4096
    """Output cap assumed for timeouts and token reservations when the job has none."""
    latency_window: int = 256
    """Recent latency ratios kept per endpoint for hedge and timeout percentiles."""
    # --- failures -----------------------------------------------------------
    failure_tau_s: float = 30.0
    """Outcome counts fade with this time constant (Finagle FailureAccrual: 30 s window)."""
    failure_prior_calls: float = 5.0
    """Pseudo-successes: one failure on little evidence is a rate of 1/6, not 1."""
    failure_cost_window: int = 5
    """Failures behind the EWMA of what a failure costs (its elapsed time)."""
    # --- circuit breaker (Envoy outlier detection, Finagle FailureAccrual) ---
    eject_after: int = 5
    eject_failure_rate: float = 0.5
    eject_min_calls: int = 20
    eject_base_s: float = 30.0
    eject_max_s: float = 300.0
    eject_jitter: float = 0.2
    max_eject_fraction: float = 0.5
    """Panic: above this share of a model's endpoints ejected, health is ignored (Envoy)."""
    # --- rate limits and capacity ---------------------------------------------
    retry_after_cap_s: float = 300.0
    """Envoy RateLimitedRetryBackOff discards above 300 s; we cap."""
    cooldown_jitter: float = 0.5
    """Cooldown = Retry-After × U[1, 1 + jitter] (Envoy: random(interval, 1.5·interval))."""
    cooldown_after: int = 2
    """Isolated 429s in a row (nothing else in flight, no success between) before a cooldown."""
    cooldown_default_s: float = 1.0
    """A cooldown without Retry-After; doubles per further 429 up to the cap below."""
    cooldown_default_cap_s: float = 30.0
    auth_unusable_s: float = 900.0
    """How long a 401/403/404 keeps an endpoint out for that model (or until restart)."""
    aimd_backoff: float = 0.5
    """Least share of the learned concurrency kept on one 429 (TCP halves)."""
    # --- priority: interactive before batch ------------------------------------
    batch_headroom: float = 0.05
    """Share of an endpoint's slots batch leaves free for interactive arrivals
    (at least one slot once the endpoint has two): batch is saturation-gated."""
    batch_floor: float = 0.1
    """Share of an endpoint's slots batch may always use while it waits (at least
    one slot, at most all but one): interactive load never starves batch for good."""
    batch_wait_s: float = 1.0
    """How long a refused batch pick counts as "batch is waiting" for the floor."""
    batch_budget_share: float = 0.5
    """Batch retries and hedges may not draw the retry budget below this share of its
    constant reserve: the rest is kept for interactive jobs."""
    # --- retries, backoff, budget --------------------------------------------
    max_attempts: int = 3
    budget_ratio: float = 0.2
    budget_min_per_s: float = 10.0
    budget_ttl_s: float = 10.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0
    deadline_margin_s: float = 0.3
    """Kept back from every deadline to publish the reply."""
    # --- hedging and timeouts -------------------------------------------------
    hedge_min_samples: int = 20
    hedge_quantile: float = 0.95
    timeout_min_samples: int = 20
    timeout_quantile: float = 0.999
    timeout_pad: float = 2.0
    min_attempt_timeout_s: float = 1.0
    default_timeout_per_token_s: float = 3600.0 / 128_000
    """Anthropic SDK: expected time = 3600 s · max_tokens / 128 000."""
    default_timeout_min_s: float = 10.0
    default_timeout_max_s: float = 600.0
    # --- speed ---------------------------------------------------------------
    decay_granularity_s: float = 0.01
    """Idle-decay factors are recomputed at most this often (one exp per 10 ms, not per pick)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"RoutingConfig.{f.name} must be >= 0, got {value}")
        for name in (
            "tau_s",
            "failure_tau_s",
            "fit_window",
            "latency_window",
            "revert_s",
            "explore_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"RoutingConfig.{name} must be > 0")
        for name in (
            "hedge_quantile",
            "timeout_quantile",
            "max_eject_fraction",
            "aimd_backoff",
            "level_alpha",
            "level_rise",
        ):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"RoutingConfig.{name} must be in (0, 1]")
        for name in ("batch_headroom", "batch_floor", "batch_budget_share"):
            if getattr(self, name) > 1:
                raise ValueError(f"RoutingConfig.{name} must be in [0, 1]")
        if (
            min(self.max_attempts, self.eject_after, self.failure_cost_window, self.cooldown_after)
            < 1
        ):
            raise ValueError("RoutingConfig: max_attempts, eject_after, windows must be >= 1")
