"""Model names: aliases, canonical names, and what to try for each.

For a name (or alias) of canonical model M:

* its **chain** is M itself (when an endpoint serves it), then M's
  ``fallbacks`` in order. The router moves along the chain only while a step
  is *unusable* — none of its endpoints can take a job for a health reason:
  ejected, probing, cooling down after 429s, unusable (401/403/404). A step
  that is merely *at capacity* — an endpoint is full (``max_concurrency``), out
  of rpm/tpm for now, or has its cold probe out — ends the walk: the job waits
  for it. A ``gpt-4.1`` job is not served by ``gpt-4.1-mini`` because
  ``gpt-4.1`` is busy, only because it is down.
* its **overflow** is M's ``overflow_to``, in order: tried only when M itself
  is at capacity, before waiting. It is how a configuration says "when gpt-4.1
  is full, gpt-4.1-mini will do".

Both are direct only: a fallback's own fallbacks and overflow are not
followed, nor an overflow model's, so what may serve a name is bounded and
obvious from that model's table. A model listed only to hold fallbacks (a
"virtual" model) resolves, and has no overflow (it is never at capacity).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from workers.routing.config import ModelRules

__all__ = ["Catalog"]


class Catalog:
    """Which canonical models a name means, in the order to try them."""

    __slots__ = ("_canonical", "_chains", "_overflow")

    def __init__(self, served: Collection[str], models: Mapping[str, ModelRules]) -> None:
        """Raises ValueError for a fallback or overflow model without endpoint, an
        overflow on a model without endpoint, or an alias that clashes."""
        chains: dict[str, tuple[str, ...]] = {m: (m,) for m in served}
        overflow: dict[str, tuple[str, ...]] = {}
        canonical = {m: m for m in served}
        for name, rules in models.items():
            for fallback in rules.fallbacks:
                if fallback not in served:
                    raise ValueError(f"fallback {fallback!r} of {name!r} has no endpoint")
            for spill in rules.overflow_to:
                if spill not in served:
                    raise ValueError(f"overflow model {spill!r} of {name!r} has no endpoint")
            if rules.overflow_to and name not in served:
                raise ValueError(f"{name!r} has overflow_to but no endpoint of its own")
            chain = tuple(dict.fromkeys(m for m in (name, *rules.fallbacks) if m in served))
            if chain:
                chains[name], canonical[name] = chain, name
            spills = tuple(dict.fromkeys(m for m in rules.overflow_to if m != name))
            if spills:
                overflow[name] = spills
        for name, rules in models.items():
            for alias in rules.aliases:
                if alias in served or alias in models or alias in canonical:
                    raise ValueError(f"alias {alias!r} of {name!r} is already a model or alias")
                if name in chains:
                    chains[alias], canonical[alias] = chains[name], name
        self._chains = chains
        self._canonical = canonical
        self._overflow = overflow

    def __repr__(self) -> str:
        spill = f" overflowing={len(self._overflow)}" if self._overflow else ""
        return f"<Catalog names={len(self._chains)}{spill}>"

    def canonical(self, name: str) -> str | None:
        """The canonical model of a name or alias; None when nothing serves it."""
        return self._canonical.get(name)

    def chain(self, name: str) -> tuple[str, ...] | None:
        """Served canonical models to try for ``name``, in order; None when unknown."""
        return self._chains.get(name)

    def overflow(self, name: str) -> tuple[str, ...]:
        """Models to try, in order, when ``name``'s own model is only at capacity."""
        model = self._canonical.get(name)
        return () if model is None else self._overflow.get(model, ())
