"""List prices from the `genai-prices` catalogue, read from the copy the package ships.

`genai-prices <https://github.com/pydantic/genai-prices>`_ is a maintained
table of providers, their API hosts and their models' prices per million
tokens (input, cache reads, cache writes, output), with the date each price
started and the prompt-size tiers some models have. llmq reads only the
snapshot bundled in the installed package: its optional auto-update
(``genai_prices.UpdatePrices``, a thread fetching from GitHub) is never
started, and the snapshot is built here from the bundled data rather than
taken from the library's process-wide one, which an updater started by some
other library could have replaced. New prices arrive with a new release of
the package (``pip install -U genai-prices``), never at run time.

Which provider prices an endpoint (:meth:`GenaiPrices.provider`): an ``azure``
or ``anthropic`` endpoint is that provider's own API; an ``openai`` endpoint
(the OpenAI wire format, which many servers speak) is the provider whose API
host the catalogue lists for its ``base_url`` (``api.openai.com``, Groq,
Together, OpenRouter, …) and no one for any other host: a vLLM or Ollama
server is not priced at a provider's list price.

The package is imported on first use only (it takes a third of a second).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from workers.prices import Listed

if TYPE_CHECKING:
    from genai_prices.data_snapshot import DataSnapshot

__all__ = ["GenaiPrices", "bundled"]

OWN_API = {"azure": "azure", "anthropic": "anthropic"}
"""Endpoint kinds that are one provider's own API, and the catalogue's name for it."""

PRICE_KEYS = {
    "input": "input_mtok",
    "cached_input": "cache_read_mtok",
    "cache_write": "cache_write_mtok",
    "output": "output_mtok",
}
"""Our price (:data:`workers.prices.FIELDS`) → the catalogue's key, per million tokens.
The catalogue's 1-hour cache-write price is not used: the usage an answer
reports does not say which cache writes were for an hour."""


class GenaiPrices:
    """The catalogue as :class:`workers.prices.Catalogue` wants it."""

    def __init__(self, snapshot: DataSnapshot, label: str, *, now: datetime | None = None) -> None:
        self._snapshot = snapshot
        self.label = label
        self._now = now or datetime.now(UTC)
        """Prices that change on a date are read as of this instant (start-up)."""

    def provider(self, kind: str, base_url: str) -> str | None:
        """The catalogue's provider billing an endpoint of ``kind`` at ``base_url``, if any."""
        if kind in OWN_API:
            return OWN_API[kind]
        try:
            return self._snapshot.find_provider(None, None, base_url).id
        except LookupError:
            return None

    def lookup(self, provider: str | None, model: str) -> Listed | None:
        """``model``'s list prices at ``provider`` (None: the provider the name suggests)."""
        try:
            found, info = self._snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            return None
        return Listed(found.id, info.id, levels(info.get_prices(self._now).__dict__))


def levels(prices: Mapping[str, Any]) -> tuple[tuple[int, dict[str, float]], ...]:
    """A model's prices by prompt size: ``(above this many prompt tokens, prices)``,
    the first above 0. A tier raises every token of a call over its threshold (the
    catalogue's rule); a price without tiers is the same at every level."""
    starts = sorted(
        {0}
        | {
            tier.start
            for key in PRICE_KEYS.values()
            if (tiers := getattr(prices.get(key), "tiers", None))
            for tier in tiers
        }
    )
    return tuple(
        (
            start,
            {
                ours: at
                for ours, key in PRICE_KEYS.items()
                if (at := _at(prices.get(key), start)) is not None
            },
        )
        for start in starts
    )


def _at(price: Any, start: int) -> float | None:
    """A catalogue price (a Decimal, tiered prices or None) for calls above ``start`` tokens."""
    if price is None:
        return None
    if isinstance(price, Decimal):
        return float(price)
    chosen = price.base
    for tier in price.tiers:  # ascending
        if start >= tier.start:
            chosen = tier.price
    return float(chosen)


@functools.cache
def bundled() -> GenaiPrices:
    """The catalogue of the installed genai-prices, loaded once per process."""
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    snapshot = DataSnapshot(providers=providers, from_auto_update=False)
    return GenaiPrices(snapshot, f"genai-prices {version('genai-prices')}")
