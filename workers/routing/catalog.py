"""Model names: aliases, canonical names, and the fallback chain of each."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from workers.routing.config import ModelRules

__all__ = ["Catalog"]


class Catalog:
    """Which canonical models a name means, in the order to try them.

    A name resolves when it, or one of its fallbacks, has an endpoint; a model
    listed only to hold fallbacks (a "virtual" model) is therefore valid.
    Fallbacks are direct only: a fallback's own fallbacks are not followed,
    so a chain is bounded and obvious from the config.
    """

    __slots__ = ("_canonical", "_chains")

    def __init__(self, served: Collection[str], models: Mapping[str, ModelRules]) -> None:
        """Raises ValueError for a fallback without endpoint or an alias that clashes."""
        chains: dict[str, tuple[str, ...]] = {m: (m,) for m in served}
        canonical = {m: m for m in served}
        for name, rules in models.items():
            for fallback in rules.fallbacks:
                if fallback not in served:
                    raise ValueError(f"fallback {fallback!r} of {name!r} has no endpoint")
            chain = tuple(dict.fromkeys(m for m in (name, *rules.fallbacks) if m in served))
            if chain:
                chains[name], canonical[name] = chain, name
        for name, rules in models.items():
            for alias in rules.aliases:
                if alias in served or alias in models or alias in canonical:
                    raise ValueError(f"alias {alias!r} of {name!r} is already a model or alias")
                if name in chains:
                    chains[alias], canonical[alias] = chains[name], name
        self._chains = chains
        self._canonical = canonical

    def __repr__(self) -> str:
        return f"<Catalog names={len(self._chains)}>"

    def canonical(self, name: str) -> str | None:
        """The canonical model of a name or alias; None when nothing serves it."""
        return self._canonical.get(name)

    def chain(self, name: str) -> tuple[str, ...] | None:
        """Served canonical models to try for ``name``, in order; None when unknown."""
        return self._chains.get(name)
