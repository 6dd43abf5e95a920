"""Fallbacks only when the model is down; overflow_to when it is only at capacity.

Issue 13: a gpt-4.1 job was served by gpt-4.1-mini whenever gpt-4.1's
endpoints were merely at max_concurrency.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from schemas import ConfigError, load_settings
from schemas.errors import ErrorCode
from schemas.settings import ModelSettings, Settings
from workers.prices import Listed, PriceBook, Rates
from workers.routing import Attempt, Choice, EndpointSpec, FailureKind, NoChoice, Work
from workers.routing.catalog import Catalog
from workers.routing.pacing import capacity_wake

Harness = Any  # tests/unit/routing/conftest.py's
Make = Callable[..., Harness]


def spec(name: str, models: list[str], max_concurrency: int = 64, **limits: Any) -> EndpointSpec:
    return EndpointSpec(name, {m: m for m in models}, max_concurrency, **limits)


def build(make: Make, models: dict[str, ModelSettings], **limits: Any) -> Harness:
    """m on a1 and a2 (one slot each); n on b; o on c; every endpoint warm."""
    h = make(
        [
            spec("a1", ["m"], max_concurrency=1, **limits),
            spec("a2", ["m"], max_concurrency=1, **limits),
            spec("b", ["n"]),
            spec("c", ["o"]),
        ],
        models=models,
    )
    for name in ("a1", "a2", "b", "c"):
        h.serve(name, 0.1)
    return h


def fill(h: Harness, *endpoints: str) -> list[Attempt]:
    return [h.begin(name) for name in endpoints]


def waits(picked: Choice | NoChoice, h: Harness, deadline_s: float = 30.0) -> NoChoice:
    """A NoChoice the dispatcher waits on (capacity_wake gives a time), not fails."""
    assert isinstance(picked, NoChoice), picked
    assert picked.code is ErrorCode.OVER_CAPACITY
    wake = capacity_wake(picked, now=h.now, deadline=h.now + deadline_s, margin_s=0.3)
    assert wake is not None and wake > h.now
    return picked


def test_a_busy_model_is_waited_for_not_replaced_by_its_fallback(make: Make) -> None:
    h = build(make, {"m": ModelSettings(fallbacks=["n"])})
    first, _ = fill(h, "a1", "a2")
    waiting = waits(h.pick("m"), h)
    assert waiting.on_completion and waiting.retry_at is None
    assert "a1=busy" in waiting.reason and "b=" not in waiting.reason
    h.router.succeed(first, now=h.tick(0.1), output_tokens=200)  # a slot frees: own model
    choice = h.choose("m")
    assert (choice.endpoint, choice.model, choice.via) == ("a1", "m", None)


def test_a_model_out_of_rpm_is_waited_for(make: Make) -> None:
    h = build(make, {"m": ModelSettings(fallbacks=["n"])}, rpm=1)
    start = h.now
    # Warming used both endpoints' one request a minute: wait for the window.
    waiting = waits(h.pick("m"), h, deadline_s=120.0)
    assert "a1=rate_limit" in waiting.reason and "b=" not in waiting.reason
    assert waiting.retry_at is not None and start + 59.0 < waiting.retry_at <= start + 60.0
    # A job whose deadline comes first ends over_capacity; it is not sent to n.
    assert capacity_wake(waiting, now=h.now, deadline=h.now + 10.0, margin_s=0.3) is None


def test_a_cold_model_whose_probe_is_out_is_waited_for(make: Make) -> None:
    h = make([spec("a", ["m"]), spec("b", ["n"])], models={"m": ModelSettings(fallbacks=["n"])})
    h.serve("b", 0.1)
    h.begin("a")  # a has never answered: one probe at a time
    assert "a=cold_probe" in waits(h.pick("m"), h).reason


@pytest.mark.parametrize(
    ("kind", "skip"),
    [
        (FailureKind.SERVER_ERROR, "ejected"),
        (FailureKind.RATE_LIMITED, "cooldown"),
        (FailureKind.AUTH, "unusable"),
    ],
)
def test_a_down_model_falls_back(make: Make, kind: FailureKind, skip: str) -> None:
    """Ejected, cooling down after 429s (unusable for this rule: the provider
    pushes back for seconds to minutes), or refusing llmq's key: the fallback serves."""
    h = build(make, {"m": ModelSettings(fallbacks=["n"], overflow_to=["o"])})
    for name in ("a1", "a2"):
        h.failing(name, kind, count=5, retry_after_s=60.0 if kind.value == "rate_limited" else None)
    assert {c.skip for c in h.router.explain("m", work=Work(100, 200), now=h.now)[:2]} == {skip}
    choice = h.choose("m")
    assert (choice.endpoint, choice.model, choice.via) == ("b", "n", "fallback")


def test_overflow_serves_a_busy_model_and_says_so(make: Make) -> None:
    h = build(make, {"m": ModelSettings(fallbacks=["n"], overflow_to=["o"])})
    fill(h, "a1", "a2")
    choice = h.choose("m")
    assert (choice.endpoint, choice.model, choice.via) == ("c", "o", "overflow")
    fill(h, *["c"] * 64)  # the overflow model is full too: wait, still not the fallback
    waiting = waits(h.pick("m"), h)
    assert "c=busy" in waiting.reason and "b=" not in waiting.reason


def test_overflow_models_are_tried_in_order(make: Make) -> None:
    h = build(make, {"m": ModelSettings(overflow_to=["n", "o"])})
    fill(h, "a1", "a2")
    assert h.choose("m").model == "n"
    h.failing("b", count=5)  # n is down: the next overflow model
    assert (h.choose("m").model, h.choose("m").via) == ("o", "overflow")


def test_an_unusable_overflow_model_means_wait(make: Make) -> None:
    h = build(make, {"m": ModelSettings(overflow_to=["o"])})
    fill(h, "a1", "a2")
    h.failing("c", FailureKind.AUTH)
    assert "c=unusable" in waits(h.pick("m"), h).reason


def test_one_endpoint_down_and_one_busy_is_at_capacity(make: Make) -> None:
    """Some endpoint is only busy: the model is at capacity, not down."""
    h = build(make, {"m": ModelSettings(fallbacks=["n"])})
    h.failing("a1", count=5)
    fill(h, "a2")
    waits(h.pick("m"), h)


def test_each_step_of_the_chain_waits_when_at_capacity(make: Make) -> None:
    """m down → n; n busy → wait for n, not o; n down too → o."""
    h = make(
        [spec("a", ["m"]), spec("b", ["n"], max_concurrency=1), spec("c", ["o"])],
        models={"m": ModelSettings(fallbacks=["n", "o"])},
    )
    for name in ("a", "b", "c"):
        h.serve(name, 0.1)
    h.failing("a", count=5)
    assert (h.choose("m").model, h.choose("m").via) == ("n", "fallback")
    fill(h, "b")
    waiting = waits(h.pick("m"), h)
    assert "b=busy" in waiting.reason and "c=" not in waiting.reason
    # The job also wakes when m's ejection ends, not only on n's completion.
    assert waiting.on_completion
    assert waiting.retry_at == h.status("a").available_at
    h.failing("b", FailureKind.AUTH)  # its attempt refused: n is now down too
    choice = h.choose("m")
    assert (choice.endpoint, choice.model, choice.via) == ("c", "o", "fallback")


def test_a_fallbacks_own_overflow_is_not_followed(make: Make) -> None:
    h = make(
        [spec("a", ["m"]), spec("b", ["n"], max_concurrency=1), spec("c", ["o"])],
        models={"m": ModelSettings(fallbacks=["n"]), "n": ModelSettings(overflow_to=["o"])},
    )
    for name in ("a", "b", "c"):
        h.serve(name, 0.1)
    h.failing("a", count=5)
    fill(h, "b")
    waits(h.pick("m"), h)
    assert h.choose("n").via == "overflow"  # asked for n itself, its overflow applies


def test_excluded_endpoints_are_not_capacity(make: Make) -> None:
    """A retry excludes what it tried: the model's other endpoints decide."""
    h = build(make, {"m": ModelSettings(fallbacks=["n"], overflow_to=["o"])})
    fill(h, "a2")
    retry = h.pick("m", exclude=frozenset({"a1"}))  # a2 is busy: wait for it, or overflow
    assert isinstance(retry, Choice) and (retry.model, retry.via) == ("o", "overflow")
    h.failing("a2", count=5)  # a2 down and a1 excluded: m is down for this retry
    retry = h.pick("m", exclude=frozenset({"a1"}))
    assert isinstance(retry, Choice) and (retry.model, retry.via) == ("n", "fallback")
    solo = make([spec("a", ["m"]), spec("b", ["n"])], models={"m": ModelSettings(fallbacks=["n"])})
    solo.serve("a", 0.1)
    solo.serve("b", 0.1)
    again = solo.pick("m", exclude=frozenset({"a"}))
    assert isinstance(again, Choice) and (again.model, again.via) == ("n", "fallback")


def test_a_wholly_ejected_model_falls_back_before_panic(make: Make) -> None:
    """Panic (routing over ejected endpoints) is the last resort of the whole chain."""
    h = make(
        [spec("a", ["m"]), spec("b", ["n"], max_concurrency=1)],
        models={"m": ModelSettings(fallbacks=["n"])},
    )
    h.serve("a", 0.1)
    h.serve("b", 0.1)
    h.failing("a", count=5)
    assert h.choose("m").model == "n"
    fill(h, "b")
    waits(h.pick("m"), h)  # n is only busy: wait for it, m stays out
    h.failing("b", FailureKind.AUTH)  # the chain is down: panic over m's endpoint
    choice = h.choose("m")
    assert (choice.endpoint, choice.via) == ("a", None)


def test_panic_over_full_endpoints_waits_and_does_not_fall_back(make: Make) -> None:
    """Most of m's endpoints ejected, the rest cooling down: panic routes over the
    ejected ones, and when those are only full, m is at capacity: the job waits
    for a slot instead of falling back to n."""
    h = make(
        [*(spec(name, ["m"], max_concurrency=1) for name in ("a1", "a2", "a3", "a4")),
         spec("b", ["n"])],
        models={"m": ModelSettings(fallbacks=["n"])},
    )  # fmt: skip
    for name in ("a1", "a2", "a3", "a4", "b"):
        h.serve(name, 0.1)
    for name in ("a1", "a2", "a3"):
        h.failing(name, count=5)
    h.failing("a4", FailureKind.RATE_LIMITED, retry_after_s=60.0, count=2)  # live, cooling
    assert h.choose("m").endpoint in {"a1", "a2", "a3"}  # panic
    for name in ("a1", "a2", "a3"):
        h.begin(name)  # panic traffic fills each one's slot
    waits(h.pick("m"), h)


def test_a_share_of_zero_is_down_not_capacity(make: Make) -> None:
    """Two workers, one slot and one request a minute: the second worker's share
    is 0, which no completion or time frees, so its jobs fall back."""
    for limits in ({"max_concurrency": 1}, {"rpm": 1}):
        h = make(
            [spec("a", ["m"], **limits), spec("b", ["n"])],
            models={"m": ModelSettings(fallbacks=["n"])},
        )
        h.router.share(1, 2, now=h.now)
        assert h.choose("m").via == "fallback", limits


def test_explain_lists_overflow_models_too(make: Make) -> None:
    h = build(make, {"m": ModelSettings(fallbacks=["n"], overflow_to=["o", "n"])})
    rows = h.router.explain("m", work=Work(10, 100), now=h.now)
    assert [(c.name, c.model) for c in rows] == [("a1", "m"), ("a2", "m"), ("b", "n"), ("c", "o")]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"m": ModelSettings(overflow_to=["zzz"])}, "overflow model 'zzz' of 'm' has no endpoint"),
        ({"v": ModelSettings(overflow_to=["m"])}, "'v' has overflow_to but no endpoint"),
    ],
)
def test_the_catalog_refuses_overflow_it_cannot_follow(
    models: dict[str, ModelSettings], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Catalog({"m", "n"}, models)


def test_the_catalog_ignores_a_model_overflowing_to_itself() -> None:
    catalog = Catalog({"m", "n"}, {"m": ModelSettings(aliases=["mm"], overflow_to=["m", "n"])})
    assert catalog.overflow("mm") == ("n",)
    assert catalog.overflow("n") == ()
    assert catalog.overflow("zzz") == ()
    assert repr(catalog) == "<Catalog names=3 overflowing=1>"


CONFIG = """
[[endpoints]]
name = "chat"
base_url = "http://127.0.0.1:1/v1"
models = ["gpt-4.1", "gpt-4.1-mini"]

[[endpoints]]
name = "embed"
base_url = "http://127.0.0.1:1/v1"
  [endpoints.models]
  "text-embedding-3-small" = { upstream = "text-embedding-3-small", kind = "embedding" }
"""


def load(tmp_path: Path, models: str) -> Settings:
    path = tmp_path / "llmq.toml"
    path.write_text(CONFIG + models, encoding="utf-8")
    return load_settings(path)


def test_settings_accept_overflow_to(tmp_path: Path) -> None:
    settings = load(tmp_path, '[models."gpt-4.1"]\noverflow_to = ["gpt-4.1-mini"]\n')
    assert settings.models["gpt-4.1"].overflow_to == ["gpt-4.1-mini"]
    assert ModelSettings().overflow_to == []


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ('[models."gpt-4.1"]\noverflow_to = ["gpt-5"]\n', "no endpoint serves 'gpt-5'"),
        (
            '[models."gpt-4.1"]\noverflow_to = ["text-embedding-3-small"]\n',
            "'text-embedding-3-small' is a embedding model",
        ),
        ('[models.virtual]\noverflow_to = ["gpt-4.1"]\n', "no endpoint serves 'virtual' itself"),
        ('[models."gpt-4.1"]\noverflow_to = ["gpt-4.1"]\n', "names 'gpt-4.1' itself"),
    ],
)
def test_settings_refuse_overflow_that_cannot_work(
    tmp_path: Path, models: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, models)
    assert "overflow_to" in str(info.value) and message in str(info.value)


class _Nothing:
    """A price catalogue that lists nothing: the configured prices apply."""

    label = "none"

    def provider(self, kind: str, base_url: str) -> str | None:
        return None

    def lookup(self, provider: str | None, model: str) -> Listed | None:
        return None


def test_a_hard_cap_reserves_at_the_dearest_overflow_model_too() -> None:
    settings = Settings(
        endpoints=[
            {"name": "a", "base_url": "http://a/v1", "models": ["cheap"], "output_per_mtok": 1.0},
            {"name": "b", "base_url": "http://b/v1", "models": ["dear"], "output_per_mtok": 9.0},
        ],
        models={"cheap": {"overflow_to": ["dear"]}},
    )
    worst = PriceBook(settings, _Nothing()).worst(settings.models)
    assert worst["cheap"].output == 9.0
    assert worst["dear"] == Rates(output=9.0)
