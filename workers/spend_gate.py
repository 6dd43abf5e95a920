"""The spend gate: middleware around routing a job.

``before`` reserves the job's worst case against the hard-capped spend
limits (or refuses it: ``over_budget``); ``after`` charges the answer's real
cost and reports it; ``failed`` charges a job that ended without one;
``release`` hands back whatever was not charged. The worker's route owns
the hold between them and releases it in a ``finally``, so concurrent jobs
can never spend past a cap together.

Attempts billed but not answered: a hedge's loser (cancelled after it was
sent) and an attempt that timed out were sent to the provider, which bills
their prompt at least. Each is charged once, on success and on failure alike,
an **estimate**: its prompt tokens as the dispatcher counted them (the
body's characters ÷ 4) at that endpoint's input price for that model, with no
output (what it generated before the cancel is unknown). The winner is
charged its reported usage once, as before; losers are never in it.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.codec import Job
from schemas.settings import Settings
from workers.attempts import Abandoned, Failed, Served
from workers.events import Event, Spent
from workers.price_catalogue import bundled
from workers.prices import PriceBook, Rates
from workers.providers import UpstreamReply
from workers.routing.pricing import estimate_usd, prompt_tokens_bound
from workers.routing.spend import Hold
from workers.spend_limits import SpendLimits

__all__ = ["SpendGate"]


class SpendGate:
    """Reserve before, charge after, release always."""

    def __init__(
        self,
        settings: Settings,
        limits: SpendLimits,
        *,
        default_max_tokens: int,
        hook: Callable[[Event], None],
        prices: PriceBook | None = None,
    ) -> None:
        self.limits = limits
        self.prices = prices or PriceBook(settings, bundled())
        """Each (endpoint, model)'s price: config, else the catalogue (workers/prices.py)."""
        self._worst = self.prices.worst(settings.models)
        self._default_max_tokens = default_max_tokens
        self._hook = hook

    def before(self, job: Job, model: str) -> Hold | str:
        """A hold on the job's worst case, or why it may not run (``over_budget``)."""
        return self.limits.reserve(model, job.tenant, self._worst_case_usd(job, model))

    def after(self, hold: Hold, job: Job, served: Served) -> float | None:
        """Charge what the answer cost (None when the upstream reported no usage)."""
        reply = served.reply
        assert isinstance(reply, UpstreamReply), "a stream is charged once it has ended"
        usage_in, usage_out = reply.prompt_tokens, reply.completion_tokens
        cost = None
        if usage_in is not None and usage_out is not None:
            price = self.prices[served.endpoint, served.model]
            cost = price.cost_usd(
                usage_in, usage_out, reply.cached_tokens or 0, reply.cache_write_tokens or 0
            )
        # Paid now, whatever happens to the reply: limits and cost count it here.
        self.limits.settle(hold, cost, model=served.model)
        self._hook(Spent(served.model, served.endpoint, job.tenant, usage_in, usage_out, cost))
        self._abandoned(job, served.abandoned)
        return cost

    def failed(self, hold: Hold, job: Job, failed: Failed) -> float:
        """A job that ended without an answer: release its hold, charge the estimates
        of its attempts billed but not answered; returns what was charged."""
        self.limits.release(hold)
        return self._abandoned(job, failed.abandoned)

    def estimate_usd(self, attempt: Abandoned) -> float:
        """What an abandoned attempt is charged: its prompt tokens at the input price."""
        try:
            price = self.prices[attempt.endpoint, attempt.model]
        except KeyError:  # not an (endpoint, model) of this configuration
            return 0.0
        return price.cost_usd(attempt.prompt_tokens, 0)

    def _abandoned(self, job: Job, attempts: tuple[Abandoned, ...]) -> float:
        total = 0.0
        for attempt in attempts:
            cost = self.estimate_usd(attempt)
            if cost <= 0:
                continue
            self.limits.spend(attempt.model, job.tenant, cost)
            # In llmq_cost_usd_total with the answers; no tokens: none were reported.
            self._hook(Spent(attempt.model, attempt.endpoint, job.tenant, None, None, cost))
            total += cost
        return total

    def release(self, hold: Hold) -> None:
        self.limits.release(hold)  # a no-op once charged

    def _worst_case_usd(self, job: Job, model: str) -> float:
        """What the job can cost at most: its body as prompt, ``n`` full completions,
        at the dearest endpoint of the model or its fallbacks, each input token at the
        dearest input price (a cache write may cost more than input) of the dearest tier."""
        if not self.limits.enabled:
            return 0.0
        worst = self._worst.get(model, Rates())
        cap = job.output_cap or self._default_max_tokens
        bound = prompt_tokens_bound(job.body_bytes)
        return estimate_usd(bound, cap, worst.dearest_input, worst.output, job.n)
