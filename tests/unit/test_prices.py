"""Prices: the decision (config, then the catalogue, then 0 with a warning), the
arithmetic of cached tokens, the catalogue's numbers checked by hand, and no
network at any point.

The decision is tested on a fake catalogue (so each rule is seen alone), then
on the real one: one model per provider kind, each cost worked out by hand from
the catalogue's list prices and compared with genai-prices' own calculation.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from click.testing import CliRunner
from genai_prices import Usage, calc_price

from llmq_cli.prices import prices_command
from schemas.codec import Job
from schemas.contract import JobKind
from schemas.settings import EndpointSettings, Settings
from workers.attempts import Served
from workers.events import Event, Spent
from workers.price_catalogue import bundled
from workers.prices import Listed, Price, PriceBook, Rates, decide
from workers.providers import adapter_for
from workers.spend_gate import SpendGate
from workers.spend_limits import SpendLimits

ROOT = Path(__file__).resolve().parents[2]


class FakeCatalogue:
    """Lists ``gpt-x`` at openai and ``claude-x`` at anthropic; records every question."""

    label = "fake 1.0"

    def __init__(self) -> None:
        self.asked: list[tuple[str | None, str]] = []

    def provider(self, kind: str, base_url: str) -> str | None:
        if kind != "openai":
            return kind
        return "openai" if "api.openai.com" in base_url else None

    def lookup(self, provider: str | None, model: str) -> Listed | None:
        self.asked.append((provider, model))
        table = {
            ("openai", "gpt-x"): ((0, {"input": 2.0, "cached_input": 0.5, "output": 8.0}),),
            ("anthropic", "claude-x"): (
                (0, {"input": 3.0, "cached_input": 0.3, "cache_write": 3.75, "output": 15.0}),
                (200_000, {"input": 6.0, "cached_input": 0.6, "cache_write": 7.5, "output": 22.5}),
            ),
        }
        key = (provider or ("anthropic" if model.startswith("claude") else "openai"), model)
        return Listed(key[0], model, table[key]) if key in table else None


def endpoint(**spec: Any) -> EndpointSettings:
    return EndpointSettings.model_validate(
        {"name": "e", "base_url": "https://api.openai.com/v1", "models": {"m": "gpt-x"}, **spec}
    )


def price(catalogue: Any = None, **spec: Any) -> Price:
    return decide(endpoint(**spec), "m", catalogue or FakeCatalogue())


# ---- the decision ---------------------------------------------------------


def test_the_catalogue_prices_a_model_nobody_priced() -> None:
    p = price()
    assert p.rates(1) == Rates(input=2.0, cached_input=0.5, cache_write=2.0, output=8.0)
    assert p.source == "catalogue fake 1.0: openai gpt-x" and p.warning is None


def test_the_model_entry_beats_the_endpoint_which_beats_the_catalogue_field_by_field() -> None:
    model = {"upstream": "gpt-x", "input_per_mtok": 1.0}
    p = price(models={"m": model}, input_per_mtok=9.0, output_per_mtok=4.0)
    # input: the entry's; output: the endpoint's; cached input: the catalogue's.
    assert p.rates(1) == Rates(input=1.0, cached_input=0.5, cache_write=1.0, output=4.0)
    assert p.source == "config + catalogue fake 1.0: openai gpt-x"
    full = {
        "upstream": "gpt-x",
        "input_per_mtok": 1.0,
        "cached_input_per_mtok": 0.1,
        "cache_write_per_mtok": 1.5,
        "output_per_mtok": 3.0,
    }
    assert price(models={"m": full}).rates(1) == Rates(1.0, 0.1, 1.5, 3.0)
    assert price(models={"m": full}).source == "config"


def test_an_unknown_model_costs_0_with_a_warning_naming_it_and_the_fix() -> None:
    p = price(models={"m": "gpt-unknown"})
    assert p.rates(10**6) == Rates() and p.source == "none"
    assert p.warning is not None
    assert p.warning.startswith(
        "no price for model m at endpoint e: cost counted as 0 (set input_per_mtok/output_per_mtok"
    )
    assert "lists no 'gpt-unknown' at openai" in p.warning


def test_a_self_hosted_server_is_not_priced_at_a_providers_list_price() -> None:
    """A vLLM host serving a model named like a listed one is not looked up."""
    catalogue = FakeCatalogue()
    p = price(catalogue, base_url="http://vllm:8000/v1")
    assert p.rates(1) == Rates() and catalogue.asked == []
    assert p.warning is not None and "is no provider host fake 1.0 lists" in p.warning
    # Prices set by hand (0 included) say what it costs, and silence the warning.
    free = price(base_url="http://vllm:8000/v1", input_per_mtok=0, output_per_mtok=0)
    assert free.warning is None and free.source == "config"


def test_price_model_names_the_catalogue_entry_and_price_provider_its_provider() -> None:
    catalogue = FakeCatalogue()
    vllm = {"base_url": "http://vllm:8000/v1"}
    p = price(catalogue, **vllm, models={"m": {"upstream": "served-as", "price_model": "gpt-x"}})
    assert p.rates(1).input == 2.0 and catalogue.asked == [(None, "gpt-x")]
    azure = {"kind": "azure", "api_version": "2024-10-21", "base_url": "https://r.openai.azure.com"}
    p = price(catalogue, **azure, models={"m": {"upstream": "my-deployment", "price_model": "x"}})
    assert catalogue.asked[-1] == ("azure", "x") and p.warning is not None
    assert "or price_model" not in p.warning  # it is set: the hint is the prices
    model = {"upstream": "claude-x", "price_provider": "anthropic"}
    assert price(catalogue, **vllm, models={"m": model}).rates(1).cache_write == 3.75


def test_a_relay_names_the_provider_whose_list_prices_apply() -> None:
    catalogue = FakeCatalogue()
    relay = {"base_url": "http://relay.internal/v1", "price_provider": "openai"}
    assert price(catalogue, **relay).rates(1).input == 2.0
    assert catalogue.asked == [("openai", "gpt-x")]
    # A model entry's provider comes before the endpoint's.
    claude = {"upstream": "claude-x", "price_provider": "anthropic"}
    assert price(catalogue, **relay, models={"m": claude}).rates(1).input == 3.0


def test_an_embedding_model_bills_input_only() -> None:
    p = price(models={"m": {"upstream": "gpt-x", "kind": "embedding"}}, output_per_mtok=5.0)
    assert p.rates(1).output == 0.0 and p.cost_usd(1000, 7) == 0.002


def test_cached_and_written_tokens_are_billed_at_their_prices() -> None:
    rates = Rates(input=3.0, cached_input=0.3, cache_write=3.75, output=15.0)
    # 10k prompt tokens: 4k read from the cache, 2k written to it, 4k plain.
    assert rates.usd(10_000, 1_000, cached=4_000, cache_write=2_000) == pytest.approx(0.0357)
    # Counts that do not add up are clamped to the prompt, never billed twice.
    assert rates.usd(100, 0, cached=500, cache_write=50) == pytest.approx(100 * 0.3 / 1e6)
    assert rates.usd(-5, -5) == 0.0


def test_a_tier_prices_every_token_of_a_call_above_its_threshold() -> None:
    p = price(models={"m": "claude-x"}, kind="anthropic", base_url="https://api.anthropic.com")
    assert p.rates(200_000).input == 3.0 and p.rates(200_001).input == 6.0
    assert p.worst == Rates(6.0, 0.6, 7.5, 22.5)
    assert "above 200000 prompt tokens: input 6" in p.describe()


def test_a_tier_none_of_our_prices_rises_in_is_dropped() -> None:
    model = {
        "upstream": "claude-x",
        **{f"{f}_per_mtok": 1.0 for f in ("input", "cached_input", "cache_write", "output")},
    }
    p = price(models={"m": model}, kind="anthropic", base_url="https://api.anthropic.com")
    assert len(p.levels) == 1 and p.source == "config"


def test_the_worst_rates_cover_every_endpoint_and_fallback() -> None:
    settings = Settings(
        endpoints=[
            {"name": "a", "base_url": "https://api.openai.com/v1", "models": {"big": "gpt-x"}},
            {
                "name": "b",
                "base_url": "http://vllm/v1",
                "models": {"big": "llama", "small": "tiny"},
                "input_per_mtok": 5.0,
                "output_per_mtok": 1.0,
            },
            {
                "name": "c",
                "kind": "anthropic",
                "base_url": "https://api.anthropic.com",
                "models": {"claude": "claude-x"},
            },
        ],
        models={"small": {"fallbacks": ["claude"]}},
    )
    worst = PriceBook(settings, FakeCatalogue()).worst(settings.models)
    assert worst["big"] == Rates(input=5.0, cached_input=5.0, cache_write=5.0, output=8.0)
    assert worst["small"] == Rates(6.0, 5.0, 7.5, 22.5)
    assert worst["small"].dearest_input == 7.5


# ---- the real catalogue, by hand -------------------------------------------

HAND_CHECKS = [
    # (endpoint, cached / written tokens of 10k prompt tokens and 1k completion
    #  tokens, the catalogue's prices per million: input, cached, write, output,
    #  and the cost worked out by hand)
    pytest.param(
        {"base_url": "https://api.openai.com/v1", "models": {"m": "gpt-4.1-mini"}},
        (4_000, 0),
        Rates(0.4, 0.1, 0.4, 1.6),
        # 6000 × 0.40 + 4000 × 0.10 + 1000 × 1.60 = 4400 µUSD
        0.0044,
        ("openai", "gpt-4.1-mini"),
        id="openai gpt-4.1-mini",
    ),
    pytest.param(
        {
            "kind": "anthropic",
            "base_url": "https://api.anthropic.com",
            "models": {"m": "claude-haiku-4-5"},
        },
        (4_000, 2_000),
        Rates(1.0, 0.1, 1.25, 5.0),
        # 4000 × 1 + 4000 × 0.10 + 2000 × 1.25 + 1000 × 5 = 11900 µUSD
        0.0119,
        ("anthropic", "claude-haiku-4-5"),
        id="anthropic claude-haiku-4-5",
    ),
    pytest.param(
        {
            "kind": "azure",
            "api_version": "2024-10-21",
            "base_url": "https://res.openai.azure.com",
            "models": {"m": {"upstream": "prod-4o", "price_model": "gpt-4o"}},
        },
        (4_000, 0),
        Rates(2.5, 1.25, 2.5, 10.0),
        # 6000 × 2.50 + 4000 × 1.25 + 1000 × 10 = 30000 µUSD
        0.03,
        ("azure", "gpt-4o"),
        id="azure deployment of gpt-4o",
    ),
]


@pytest.mark.parametrize(("spec", "cache", "rates", "usd", "listed"), HAND_CHECKS)
def test_the_catalogue_prices_checked_by_hand(
    spec: dict[str, Any],
    cache: tuple[int, int],
    rates: Rates,
    usd: float,
    listed: tuple[str, str],
) -> None:
    p = decide(endpoint(**spec), "m", bundled())
    assert p.warning is None and p.source.endswith(f"{listed[0]} {listed[1]}")
    assert p.rates(10_000) == rates
    cached, written = cache
    assert p.cost_usd(10_000, 1_000, cached, written) == pytest.approx(usd, abs=1e-12)
    # genai-prices' own calculation agrees (its input_tokens count cached ones too).
    usage = Usage(
        input_tokens=10_000,
        cache_read_tokens=cached,
        cache_write_tokens=written,
        output_tokens=1_000,
    )
    assert float(calc_price(usage, listed[1], provider_id=listed[0]).total_price) == usd


def test_claude_sonnet_4_5_above_200k_tokens_checked_by_hand() -> None:
    spec = {"kind": "anthropic", "base_url": "https://api.anthropic.com"}
    p = decide(endpoint(**spec, models={"m": "claude-sonnet-4-5"}), "m", bundled())
    assert p.rates(10_000) == Rates(3.0, 0.3, 3.75, 15.0)
    assert p.rates(250_000) == Rates(6.0, 0.6, 7.5, 22.5)
    # 190000 × 6 + 50000 × 0.60 + 10000 × 7.50 + 2000 × 22.50 = 1.29 USD
    assert p.cost_usd(250_000, 2_000, 50_000, 10_000) == pytest.approx(1.29)


def test_an_embedding_model_from_the_catalogue() -> None:
    spec = {"models": {"m": {"upstream": "text-embedding-3-small", "kind": "embedding"}}}
    p = decide(endpoint(**spec), "m", bundled())
    assert p.rates(1).input == 0.02 and p.cost_usd(50_000, 0) == pytest.approx(0.001)


def test_the_catalogue_is_never_fetched() -> None:
    """Deciding every price and costing an answer opens no socket, resolves no
    name and starts no updater thread (genai-prices' auto-update stays off)."""
    code = """
import socket, threading
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:2])
    raise OSError("no network in this test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
from schemas.settings import Settings
from workers.price_catalogue import bundled
from workers.prices import PriceBook
import genai_prices.update_prices as updates
settings = Settings(endpoints=[
    {"name": "o", "base_url": "https://api.openai.com/v1", "models": ["gpt-4.1-mini"]},
    {"name": "a", "kind": "anthropic", "base_url": "https://api.anthropic.com",
     "models": ["claude-haiku-4-5"]},
])
book = PriceBook(settings, bundled())
assert book["o", "gpt-4.1-mini"].cost_usd(1000, 100) > 0
assert book["a", "claude-haiku-4-5"].cost_usd(1000, 100, 500, 0) > 0
print(attempts, updates._shared_updater.thread, threading.active_count())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["[]", "None", "1"]


# ---- the shipped examples -------------------------------------------------


def shipped_configs() -> dict[str, dict[str, Any]]:
    """Every configuration the repository ships or documents, as TOML data."""
    configs = {
        name: tomllib.loads((ROOT / name).read_text(encoding="utf-8"))
        for name in (
            "llmq_cli/demo.toml",
            "deploy/demo/llmq.example.toml",
            "deploy/compose/llmq.toml",
        )
    }
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text(encoding="utf-8"))
    configs["deploy/k8s/configmap.yaml"] = tomllib.loads(configmap["data"]["llmq.toml"])
    doc = (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
    for i, block in enumerate(re.findall(r"```toml\n(.*?)```", doc, re.S)):
        if "[[endpoints]]" in block:  # a whole configuration, not a fragment
            configs[f"docs/configuration.md #{i}"] = tomllib.loads(block)
    return configs


@pytest.mark.parametrize(("name", "data"), list(shipped_configs().items()))
def test_the_shipped_examples_price_real_models_at_their_list_prices(
    name: str, data: dict[str, Any]
) -> None:
    """No shipped model goes unpriced, and none is priced at another's list price
    by hand (gpt-4.1-mini was priced at gpt-4.1's $2/$8 per million)."""
    settings = Settings(endpoints=data["endpoints"], models=data.get("models", {}))
    prices = list(PriceBook(settings, bundled()))
    assert prices and [p.warning for p in prices] == [None] * len(prices)
    for p in prices:
        if p.model == "gpt-4.1-mini" and p.rates(1).input:  # 0: served self-hosted
            assert (p.rates(1).input, p.rates(1).output) == (0.4, 1.6), p.describe()
        if "config" not in p.source:
            assert p.source.startswith("catalogue genai-prices "), p.describe()


# ---- the spend gate -------------------------------------------------------


def _job(model: str) -> Job:
    return Job(
        job_id="j",
        correlation_id="j",
        reply_to=None,
        sla_class="interactive",
        model=model,
        body={},
        output_cap=100,
        prompt_chars=10,
        published_ms=0,
        deadline_ms=1,
        body_bytes=1000,
    )


def _gate(endpoint: dict[str, Any], events: list[Event]) -> SpendGate:
    settings = Settings(
        endpoints=[endpoint],
        budgets={"models": {"m": {"monthly_usd": 100, "hard_cap": True}}},
    )
    limits = SpendLimits(settings.budgets, origin="w")
    return SpendGate(settings, limits, default_max_tokens=1000, hook=events.append)


CHAT = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
OPENAI_USAGE = {
    "prompt_tokens": 10_000,
    "completion_tokens": 1_000,
    "prompt_tokens_details": {"cached_tokens": 4_000},
}
ANSWERS = [
    # The provider's answer as its API reference shows it, decoded by llmq's
    # adapter, then charged: the cost checked by hand above.
    pytest.param(
        {"base_url": "https://api.openai.com/v1", "models": {"m": "gpt-4.1-mini"}},
        {"object": "chat.completion", **CHAT, "usage": OPENAI_USAGE},
        0.0044,
        id="openai gpt-4.1-mini",
    ),
    pytest.param(
        {
            "kind": "anthropic",
            "base_url": "https://api.anthropic.com",
            "models": {"m": "claude-haiku-4-5"},
        },
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 4_000,
                "cache_creation_input_tokens": 2_000,
                "cache_read_input_tokens": 4_000,
                "output_tokens": 1_000,
            },
        },
        0.0119,
        id="anthropic claude-haiku-4-5",
    ),
    pytest.param(
        {
            "kind": "azure",
            "api_version": "2024-10-21",
            "base_url": "https://res.openai.azure.com",
            "models": {"m": {"upstream": "prod-4o", "price_model": "gpt-4o"}},
        },
        {"object": "chat.completion", **CHAT, "usage": OPENAI_USAGE},
        0.03,
        id="azure deployment of gpt-4o",
    ),
]


@pytest.mark.parametrize(("spec", "answer", "usd"), ANSWERS)
def test_the_spend_gate_charges_an_answer_as_its_provider_bills_it(
    spec: dict[str, Any], answer: dict[str, Any], usd: float
) -> None:
    events: list[Event] = []
    gate = _gate({"name": "e", **spec}, events)
    settings_endpoint = EndpointSettings.model_validate({"name": "e", **spec})
    reply = adapter_for(settings_endpoint).answer(
        JobKind.CHAT, 200, {}, orjson.dumps(answer), now=0.0
    )
    hold = gate.before(_job("m"), "m")
    assert not isinstance(hold, str)
    cost = gate.after(hold, _job("m"), Served(reply, "e", "m", 1, False, 1.0))
    assert cost == pytest.approx(usd, abs=1e-12)
    assert [e.cost_usd for e in events if isinstance(e, Spent)] == [cost]


def test_the_reservation_prices_every_input_token_at_the_dearest_input_price() -> None:
    spec = {"kind": "anthropic", "base_url": "https://api.anthropic.com"}
    gate = _gate({"name": "e", **spec, "models": {"m": "claude-haiku-4-5"}}, [])
    hold = gate.before(_job("m"), "m")
    assert not isinstance(hold, str)
    # 1000 body bytes bound 1000 prompt tokens, each at most a cache write (1.25),
    # and 100 output tokens at 5.
    assert hold.amount_usd == pytest.approx((1000 * 1.25 + 100 * 5.0) / 1e6)


# ---- llmq prices ----------------------------------------------------------


def test_llmq_prices_shows_each_price_and_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)
    config = tmp_path / "llmq.toml"
    config.write_text(
        """
[[endpoints]]
name = "openai"
base_url = "https://api.openai.com/v1"
models = ["gpt-4.1-mini"]

[[endpoints]]
name = "local"
base_url = "http://127.0.0.1:8000/v1"
models = ["llama"]
""",
        encoding="utf-8",
    )
    result = CliRunner().invoke(prices_command, ["--config", str(config)])
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == [
        "endpoint/model",
        "input",
        "cached input",
        "cache write",
        "output",
        "source",
    ]
    assert lines[1].split("\t")[:5] == ["openai/gpt-4.1-mini", "0.4", "0.1", "0.4", "1.6"]
    assert lines[1].endswith("catalogue genai-prices 0.2.5: openai gpt-4.1-mini")
    assert lines[2].split("\t") == ["local/llama", "0", "0", "0", "0", "none"]
    assert "no price for model llama at endpoint local" in result.stderr
    assert result.exit_code == 1
