"""What the jobs of each model usually look like, for predictions before the facts.

* Typical output length per model: predictions use ``min(max_tokens, typical)``,
  because a 4096-token cap usually yields a few hundred tokens.
* Cold estimate per model: an endpoint without history is predicted at the
  best base and best per-token time among the model's warm endpoints, or the
  configured prior when none is warm. Refreshed at most once a second.
"""

from __future__ import annotations

from collections.abc import Sequence

from workers.routing.config import RoutingConfig, Work
from workers.routing.endpoint import EndpointState

__all__ = ["Workload"]

_COLD_REFRESH_S = 1.0


class Workload:
    """Per-model typical output and cold-endpoint estimate."""

    __slots__ = ("_cold", "_config", "_typical")

    def __init__(self, config: RoutingConfig) -> None:
        self._config = config
        self._typical: dict[str, tuple[float, int]] = {}
        self._cold: dict[str, tuple[float, float, float]] = {}

    def __repr__(self) -> str:
        typical = {m: round(t) for m, (t, _) in self._typical.items()}
        return f"<Workload typical_output={typical}>"

    def tokens(self, model: str | None, work: Work) -> float:
        """Output tokens to predict with: the job's cap, but no more than usual."""
        if work.by_input:
            return float(work.prompt_tokens)
        cap = work.output_tokens
        seen = self._typical.get(model) if model is not None else None
        if seen is None:
            return float(cap) if cap is not None else float(self._config.default_output_tokens)
        return min(float(cap), seen[0]) if cap is not None else seen[0]

    def reserve(self, work: Work) -> float:
        """Tokens to reserve in a tpm bucket: prompt + the whole output cap (Cerebras)."""
        if work.by_input:
            return float(work.prompt_tokens)
        cap = work.output_tokens
        return float(
            work.prompt_tokens + (cap if cap is not None else self._config.default_max_tokens)
        )

    def observe(self, model: str, output_tokens: float) -> None:
        """An answer's length: a plain mean for the first fit_window answers, then an EWMA."""
        typical, seen = self._typical.get(model, (0.0, 0))
        seen += 1
        alpha = max(1.0 / seen, 1.0 / self._config.fit_window)
        self._typical[model] = (typical + alpha * (output_tokens - typical), seen)

    def forget_cold(self) -> None:
        """An endpoint got its first sample: recompute the cold estimates."""
        self._cold.clear()

    def cold_s(
        self, model: str, now: float, tokens: float, entries: Sequence[tuple[EndpointState, str]]
    ) -> float:
        """Optimistic latency of ``tokens`` on an endpoint of ``model`` without history."""
        cached = self._cold.get(model)
        if cached is None or not 0 <= now - cached[0] < _COLD_REFRESH_S:
            warm = [s.latency for s, _ in entries if s.latency.samples]
            if warm:
                cached = (now, min(e.base_s for e in warm), min(e.per_token_s for e in warm))
            else:
                cached = (now, self._config.prior_base_s, self._config.prior_per_token_s)
            self._cold[model] = cached
        return cached[1] + cached[2] * tokens
