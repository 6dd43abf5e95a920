"""The spend gate: middleware around routing a job.

``before`` reserves the job's worst case against the hard-capped spend
limits (or refuses it: ``over_budget``); ``after`` charges the answer's real
cost and reports it; ``release`` hands back whatever was not charged. The
worker's route owns the hold between the two and releases it in a
``finally``, so concurrent jobs can never spend past a cap together.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.codec import Job
from schemas.settings import Settings
from workers.attempts import Served
from workers.events import Event, Spent
from workers.routing.pricing import estimate_usd, prompt_tokens_bound
from workers.routing.spend import Hold
from workers.spend_limits import SpendLimits

__all__ = ["SpendGate", "worst_prices"]


def worst_prices(settings: Settings) -> dict[str, tuple[float, float]]:
    """Per canonical model, the highest (input, output) USD per million tokens among
    the endpoints that may serve it, fallbacks included: what a hard cap reserves."""
    prices: dict[str, tuple[float, float]] = {}
    for endpoint in settings.endpoints:
        for model in endpoint.models:
            pin, pout = endpoint.price(model)
            old = prices.get(model, (0.0, 0.0))
            prices[model] = (max(old[0], pin), max(old[1], pout))
    worst = dict(prices)
    for model, spec in settings.models.items():
        for fallback in spec.fallbacks:
            a, b = worst.get(model, (0.0, 0.0)), prices.get(fallback, (0.0, 0.0))
            worst[model] = (max(a[0], b[0]), max(a[1], b[1]))
    return worst


class SpendGate:
    """Reserve before, charge after, release always."""

    def __init__(
        self,
        settings: Settings,
        limits: SpendLimits,
        *,
        default_max_tokens: int,
        hook: Callable[[Event], None],
    ) -> None:
        self.limits = limits
        self._worst = worst_prices(settings)
        self._endpoints = {e.name: e for e in settings.endpoints}
        self._default_max_tokens = default_max_tokens
        self._hook = hook

    def before(self, job: Job, model: str) -> Hold | str:
        """A hold on the job's worst case, or why it may not run (``over_budget``)."""
        return self.limits.reserve(model, job.tenant, self._worst_case_usd(job, model))

    def after(self, hold: Hold, job: Job, served: Served) -> float | None:
        """Charge what the answer cost (None when the upstream reported no usage)."""
        usage_in, usage_out = served.reply.prompt_tokens, served.reply.completion_tokens
        cost = None
        if usage_in is not None and usage_out is not None:
            price_in, price_out = self._endpoints[served.endpoint].price(served.model)
            cost = round((usage_in * price_in + usage_out * price_out) / 1e6, 8)
        # Paid now, whatever happens to the reply: limits and cost count it here.
        self.limits.settle(hold, cost, model=served.model)
        self._hook(Spent(served.model, served.endpoint, job.tenant, usage_in, usage_out, cost))
        return cost

    def release(self, hold: Hold) -> None:
        self.limits.release(hold)  # a no-op once charged

    def _worst_case_usd(self, job: Job, model: str) -> float:
        """What the job can cost at most: its body as prompt, ``n`` full completions,
        at the dearest endpoint of the model or its fallbacks."""
        if not self.limits.enabled:
            return 0.0
        price_in, price_out = self._worst.get(model, (0.0, 0.0))
        cap = job.output_cap or self._default_max_tokens
        return estimate_usd(prompt_tokens_bound(job.body_bytes), cap, price_in, price_out, job.n)
