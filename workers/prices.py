"""What a model costs at an endpoint, where that price came from, and what an answer cost.

Four prices, in USD per million tokens: input, cached input (tokens read from
the provider's prompt cache), cache write (tokens written to it: Anthropic
bills them above the input price) and output. Each is taken from the first
place that has it:

1. the model's entry at the endpoint (``endpoints.N.models.X.input_per_mtok``, …),
2. the endpoint (``endpoints.N.input_per_mtok``, …): negotiated rates,
3. the price catalogue (:mod:`workers.price_catalogue`: list prices), under
   the model's ``price_model`` or else its ``upstream`` name, for the provider
   the model entry or else the endpoint names (``price_provider``), else the
   endpoint's own (its kind's, or its host's if the catalogue lists it). An
   endpoint of no known provider (a vLLM server, an unnamed relay) is looked
   up only for a model entry with a ``price_model``: a self-hosted Llama is
   not billed at a provider's list price;
4. else cached input and cache writes cost what input costs, and input and
   output cost 0 — with a warning when nothing at all was found.

An embedding model's output costs 0 whatever is set (embeddings bill input
only). Some catalogue prices rise with the prompt (a tier above 200k tokens
raises every token of that call): a price has one set of rates per tier.

Pure: the catalogue is handed in, so the decision is tested without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from schemas.settings import EndpointModel, EndpointSettings, ModelSettings, Settings

__all__ = ["FIELDS", "Catalogue", "Listed", "Price", "PriceBook", "Rates", "decide"]

FIELDS = ("input", "cached_input", "cache_write", "output")
"""The prices; each is ``<field>_per_mtok`` in the configuration."""


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens of each kind."""

    input: float = 0.0
    cached_input: float = 0.0
    cache_write: float = 0.0
    output: float = 0.0

    def usd(self, prompt: int, completion: int, cached: int = 0, cache_write: int = 0) -> float:
        """What the provider bills: ``prompt`` counts every input token, the ``cached``
        reads and the ``cache_write`` writes included; the rest is billed as input."""
        prompt = max(0, prompt)
        cached = min(max(0, cached), prompt)
        written = min(max(0, cache_write), prompt - cached)
        fresh = prompt - cached - written
        return (
            fresh * self.input
            + cached * self.cached_input
            + written * self.cache_write
            + max(0, completion) * self.output
        ) / 1e6

    def highest(self, other: Rates) -> Rates:
        """Each price at the higher of the two."""
        return Rates(*(max(getattr(self, f), getattr(other, f)) for f in FIELDS))

    @property
    def dearest_input(self) -> float:
        """The most one input token can cost (a cache write, if dearer than input)."""
        return max(self.input, self.cached_input, self.cache_write)


@dataclass(frozen=True, slots=True)
class Listed:
    """A model as the catalogue lists it."""

    provider: str
    model: str
    """The catalogue's ids, which may differ from the name looked up (a dated alias)."""
    levels: tuple[tuple[int, Mapping[str, float]], ...]
    """``(above this many prompt tokens, prices by field)``, ascending, the first
    above 0. A price the catalogue does not list is absent."""


class Catalogue(Protocol):
    """Where list prices come from (:func:`workers.price_catalogue.bundled`)."""

    label: str
    """Its name and version, as the start-up log shows it."""

    def provider(self, kind: str, base_url: str) -> str | None:
        """Who bills an endpoint of this kind at this URL, or None (not a known host)."""
        ...

    def lookup(self, provider: str | None, model: str) -> Listed | None:
        """A model's list prices (``provider`` None: guessed from the name), or None."""
        ...


@dataclass(frozen=True, slots=True)
class Price:
    """What one model costs at one endpoint."""

    endpoint: str
    model: str
    levels: tuple[tuple[int, Rates], ...]
    """``(above this many prompt tokens, rates)``, ascending, the first above 0."""
    source: str
    """``config``, ``catalogue <name> <version>: <provider> <model>``, both (``+``), or ``none``."""
    warning: str | None = None

    def rates(self, prompt_tokens: int) -> Rates:
        chosen = self.levels[0][1]
        for above, rates in self.levels[1:]:
            if prompt_tokens > above:
                chosen = rates
        return chosen

    def cost_usd(
        self, prompt: int, completion: int, cached: int = 0, cache_write: int = 0
    ) -> float:
        """What one answer cost, to the 1e-8 USD."""
        return round(self.rates(prompt).usd(prompt, completion, cached, cache_write), 8)

    @property
    def worst(self) -> Rates:
        """The highest rates of any tier."""
        worst = Rates()
        for _, rates in self.levels:
            worst = worst.highest(rates)
        return worst

    def describe(self) -> str:
        """One line: the rates (per tier) and where they came from."""
        parts = [_rates_text(self.levels[0][1])]
        parts += [f"above {above} prompt tokens: {_rates_text(r)}" for above, r in self.levels[1:]]
        return f"{self.endpoint}/{self.model}: {'; '.join(parts)} USD/Mtok; source: {self.source}"


def _rates_text(rates: Rates) -> str:
    return ", ".join(f"{f.replace('_', ' ')} {getattr(rates, f):g}" for f in FIELDS)


def decide(endpoint: EndpointSettings, model: str, catalogue: Catalogue) -> Price:
    """The price of canonical ``model`` at ``endpoint`` (the module's rule)."""
    entry = endpoint.models[model]
    configured = {f: v for f in FIELDS if (v := _configured(entry, endpoint, f)) is not None}
    listed, why_not = _listed(endpoint, entry, catalogue)
    embedding = entry.kind == "embedding"
    levels = listed.levels if listed else ((0, {}),)
    rates: list[tuple[int, Rates]] = []
    for above, prices in levels:
        level = _rates({**prices, **configured}, embedding=embedding)
        if not rates or rates[-1][1] != level:  # a tier no price of ours rises in
            rates.append((above, level))
    used = set(FIELDS) - ({"output"} if embedding else set())
    from_catalogue = bool(listed) and any(f in levels[0][1] for f in used - set(configured))
    sources = ["config"] if configured else []
    if listed and from_catalogue:
        sources.append(f"catalogue {catalogue.label}: {listed.provider} {listed.model}")
    warning = None
    if not configured and not from_catalogue:
        hint = "" if entry.price_model else ", or price_model"
        warning = (
            f"no price for model {model} at endpoint {endpoint.name}: cost counted as 0"
            f" (set input_per_mtok/output_per_mtok{hint}); {why_not}"
        )
    return Price(endpoint.name, model, tuple(rates), " + ".join(sources) or "none", warning)


def _configured(entry: EndpointModel, endpoint: EndpointSettings, field: str) -> float | None:
    own: float | None = getattr(entry, f"{field}_per_mtok")
    return own if own is not None else getattr(endpoint, f"{field}_per_mtok")


def _listed(
    endpoint: EndpointSettings, entry: EndpointModel, catalogue: Catalogue
) -> tuple[Listed | None, str]:
    """The catalogue's entry for the model, or why there is none."""
    name = entry.price_model or entry.upstream
    provider = (
        entry.price_provider
        or endpoint.price_provider
        or catalogue.provider(endpoint.kind, endpoint.base_url)
    )
    if provider is None and entry.price_model is None:
        return None, (
            f"{endpoint.base_url} is no provider host {catalogue.label} lists,"
            " so its list prices are not looked up"
        )
    listed = catalogue.lookup(provider, name)
    if listed is None:
        where = f" at {provider}" if provider else ""
        return None, f"{catalogue.label} lists no {name!r}{where}"
    return listed, ""


def _rates(prices: Mapping[str, float], *, embedding: bool) -> Rates:
    given = prices.get("input", 0.0)
    return Rates(
        input=given,
        cached_input=prices.get("cached_input", given),
        cache_write=prices.get("cache_write", given),
        output=0.0 if embedding else prices.get("output", 0.0),
    )


class PriceBook:
    """Every (endpoint, canonical model)'s price, decided once at start-up."""

    def __init__(self, settings: Settings, catalogue: Catalogue) -> None:
        self._prices = {
            (e.name, m): decide(e, m, catalogue) for e in settings.endpoints for m in e.models
        }

    def __getitem__(self, key: tuple[str, str]) -> Price:
        return self._prices[key]

    def __iter__(self) -> Iterator[Price]:
        return iter(self._prices.values())

    def worst(self, models: Mapping[str, ModelSettings]) -> dict[str, Rates]:
        """Per canonical model, the highest rates among the endpoints that may serve it,
        its fallbacks' and overflow models' included: what a hard cap reserves."""
        served: dict[str, Rates] = {}
        for price in self:
            served[price.model] = served.get(price.model, Rates()).highest(price.worst)
        worst = dict(served)
        for model, spec in models.items():
            for other in (*spec.fallbacks, *spec.overflow_to):
                worst[model] = worst.get(model, Rates()).highest(served.get(other, Rates()))
        return worst
