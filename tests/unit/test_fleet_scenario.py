"""The fleet's pure parts: scenario parsing, windows, and what request #n gets."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from workers.fleet import (
    Endpoint,
    Outcome,
    Scenario,
    ScenarioError,
    endpoint_rng,
    load_scenario,
    plan_request,
)
from workers.fleet.plan import effective, is_down, latency_s, next_change, window_active
from workers.fleet.scenario import Latency, Window
from workers.fleet.wire import ChatCall, Refusal, completion_text, parse_chat, prompt_tokens

SCENARIOS = Path(__file__).resolve().parents[2] / "workers" / "fleet" / "scenarios"


def endpoint(**fields: Any) -> Endpoint:
    return Endpoint.model_validate({"name": "e", "models": ["m"], **fields})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


# --- parsing -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "zero", "faults"])
def test_shipped_scenarios_load(name: str) -> None:
    """Every shipped scenario is valid and uses fixed, distinct ports."""
    scenario = load_scenario(SCENARIOS / f"{name}.toml")
    assert all(e.port for e in scenario.endpoints)


def test_demo_has_the_promised_shape() -> None:
    """Seven endpoints on 18101-18107, one with 5xx, one with a repeating spike, and
    every provider kind (the demo mixes them: issue 16)."""
    scenario = load_scenario(SCENARIOS / "demo.toml")
    assert [e.port for e in scenario.endpoints] == list(range(18101, 18108))
    assert {e.kind for e in scenario.endpoints} == {"openai", "azure", "anthropic"}
    assert any(e.error_rate > 0 for e in scenario.endpoints)
    assert any(w.every_s for e in scenario.endpoints for w in e.windows)
    assert scenario.key_for(scenario.endpoints[0]) == "sk-fleet-demo"


def test_defaults_and_shorthands() -> None:
    """A bare number is a constant latency or an exact length; the rest defaults."""
    e = endpoint(latency_ms=50, output_tokens=7)
    assert e.latency_ms == Latency(median=50, p99=50)
    assert (e.output_tokens.min, e.output_tokens.max) == (7, 7)
    assert endpoint(latency_ms={"median": 20}).latency_ms.p99 == 20
    assert e.port == 0
    assert e.over_capacity == "queue"
    assert e.hang_max_s == 600


def test_api_key_inheritance() -> None:
    """Endpoints inherit the scenario key, may override it, and "" turns it off."""
    scenario = Scenario.model_validate(
        {
            "api_key": "top",
            "endpoints": [
                {"name": "a", "models": ["m"]},
                {"name": "b", "models": ["m"], "api_key": "own"},
                {"name": "c", "models": ["m"], "api_key": ""},
            ],
        }
    )
    keys = [scenario.key_for(e) for e in scenario.endpoints]
    assert keys == ["top", "own", None]
    assert (
        Scenario.model_validate({"endpoints": [{"name": "a", "models": ["m"]}]}).key_for(endpoint())
        is None
    )


def test_with_ephemeral_ports() -> None:
    """Shipped scenarios can run on free ports beside the demo."""
    scenario = load_scenario(SCENARIOS / "demo.toml").with_ephemeral_ports()
    assert {e.port for e in scenario.endpoints} == {0}


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[[endpoints]]\nname = "fast"\nmodels = ["m"]\neror_rate = 0.1\n',
            "endpoints.0 (fast).eror_rate: Extra inputs are not permitted",
        ),
        (
            '[[endpoints]]\nname = "fast"\nmodels = ["m"]\nlatency_ms = {median = 80, p99 = 10}\n',
            "endpoints.0 (fast).latency_ms: Value error, p99 (10.0) must be >= median (80.0)",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\nerror_rate = 1.5\n',
            "endpoints.0 (x).error_rate: Input should be less than or equal to 1",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\nerror_rate = 0.6\nhang_rate = 0.6\n',
            "endpoints.0 (x): Value error, rate_limit_rate + hang_rate + error_rate",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\nerror_rate = 0.5\n'
            "[[endpoints.windows]]\nstart_s = 1\nend_s = 2\nhang_rate = 0.7\n",
            "endpoints.0 (x): Value error, windows.0: rate_limit_rate",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\n'
            "[[endpoints.windows]]\nstart_s = 5\nend_s = 5\n",
            "endpoints.0 (x).windows.0: Value error, end_s (5.0) must be > start_s (5.0)",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\n'
            "[[endpoints.windows]]\nstart_s = 0\nend_s = 10\nevery_s = 10\n",
            "every_s (10.0) must be longer than the window",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = []\n',
            "endpoints.0 (x).models: Tuple should have at least 1 item",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\nover_capacity = "drop"\n',
            "endpoints.0 (x).over_capacity: Input should be 'queue' or '429'",
        ),
        (
            '[[endpoints]]\nname = "x"\nmodels = ["m"]\nerror_status = 404\n',
            "endpoints.0 (x).error_status: Input should be greater than or equal to 500",
        ),
        (
            '[[endpoints]]\nname = "a"\nmodels = ["m"]\nport = 9\n'
            '[[endpoints]]\nname = "b"\nmodels = ["m"]\nport = 9\n',
            "scenario: Value error, endpoint ports must be unique: [9, 9]",
        ),
        (
            '[[endpoints]]\nname = "a"\nmodels = ["m"]\n'
            '[[endpoints]]\nname = "a"\nmodels = ["m"]\n',
            "endpoint names must be unique",
        ),
        ("seed = 1\n", "scenario error: endpoints: Field required"),
        ('[[endpoints]]\nname = "bad name"\nmodels = ["m"]\n', "endpoints.0 (bad name).name"),
        ("[[endpoints]\n", "invalid TOML"),
    ],
)
def test_invalid_scenarios_name_the_field(tmp_path: Path, toml: str, expected: str) -> None:
    """Each problem is reported on its own line, naming the field and the file."""
    path = write(tmp_path, toml)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ScenarioError too, not a traceback."""
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "nope.toml")


def test_model_validate_raises_pydantic_errors() -> None:
    """The dict form raises pydantic's ValidationError with the location."""
    with pytest.raises(ValidationError, match=r"endpoints\.0\.hang_rate"):
        Scenario.model_validate({"endpoints": [{"name": "a", "models": ["m"], "hang_rate": -1}]})


def test_models_are_frozen() -> None:
    """Scenarios are values: nobody changes an endpoint behind the fleet's back."""
    e = endpoint()
    with pytest.raises(ValidationError):
        e.error_rate = 0.5  # type: ignore[misc]


# --- windows -----------------------------------------------------------------


def test_single_window() -> None:
    """Start inclusive, end exclusive."""
    w = Window(start_s=10, end_s=15)
    assert [window_active(w, t) for t in (9.99, 10, 14.99, 15, 100)] == [
        False,
        True,
        True,
        False,
        False,
    ]


def test_repeating_window() -> None:
    """With every_s the window comes back each period."""
    w = Window(start_s=10, end_s=15, every_s=30)
    active = [t for t in range(100) if window_active(w, t)]
    assert active == [10, 11, 12, 13, 14, 40, 41, 42, 43, 44, 70, 71, 72, 73, 74]


def test_effective_overrides() -> None:
    """Active windows override rates (later wins), multiply latency, OR down."""
    e = endpoint(
        error_rate=0.1,
        windows=[
            {"start_s": 0, "end_s": 10, "latency_x": 2, "error_rate": 0.5},
            {"start_s": 5, "end_s": 10, "latency_x": 3, "error_rate": 0.7, "down": True},
        ],
    )
    assert effective(e, 20).error_rate == 0.1
    assert effective(e, 20).latency_x == 1
    assert (effective(e, 1).error_rate, effective(e, 1).latency_x) == (0.5, 2)
    early, late = effective(e, 1), effective(e, 6)
    assert (late.error_rate, late.latency_x, late.down) == (0.7, 6, True)
    assert not early.down
    assert effective(e, 6).hang_rate == 0


def test_down_edges() -> None:
    """next_change walks the open/close edges of down windows, repeating or not."""
    e = endpoint(
        windows=[
            {"start_s": 10, "end_s": 15, "every_s": 30, "down": True},
            {"start_s": 2, "end_s": 3, "down": True},
            {"start_s": 0, "end_s": 100, "latency_x": 5},  # not a down window
        ]
    )
    edges, t = [], 0.0
    while (edge := next_change(e, t)) is not None and edge < 80:
        edges.append(edge)
        t = edge
    assert edges == [2, 3, 10, 15, 40, 45, 70, 75]
    assert [is_down(e, t) for t in (2.5, 3, 12, 15, 41)] == [True, False, True, False, True]
    assert next_change(endpoint(), 0) is None


# --- plans -------------------------------------------------------------------


def test_latency_fit() -> None:
    """z = 0 gives the median, z at the 99th percentile gives p99."""
    lat = Latency(median=80, p99=200)
    assert latency_s(lat, 0.0) == pytest.approx(0.080)
    assert latency_s(lat, 2.3263478740408408) == pytest.approx(0.200)
    assert latency_s(Latency(median=50, p99=50), 3.0) == pytest.approx(0.050)


def test_latency_quantiles_from_draws() -> None:
    """Sampled latencies have about the configured median and p99."""
    e = endpoint(latency_ms={"median": 80, "p99": 200})
    rng = random.Random(3)
    delays = sorted(plan_request(e, rng, 0).delay_s for _ in range(20_000))
    assert delays[10_000] == pytest.approx(0.080, rel=0.05)
    assert delays[19_800] == pytest.approx(0.200, rel=0.1)


def test_per_token_time_and_cap() -> None:
    """Per-token time adds to the latency; max_tokens caps the length ("length")."""
    e = endpoint(latency_ms=10, ms_per_token=2, output_tokens=100)
    plan = plan_request(e, random.Random(1), 0)
    assert (plan.completion_tokens, plan.finish_reason) == (100, "stop")
    assert plan.delay_s == pytest.approx(0.010 + 0.200)
    capped = plan_request(e, random.Random(1), 0, max_tokens=10)
    assert (capped.completion_tokens, capped.finish_reason) == (10, "length")
    assert capped.delay_s == pytest.approx(0.030)


def test_outcome_rates() -> None:
    """Each fault takes its share; 429s answer at once; errors skip per-token time."""
    e = endpoint(
        latency_ms=10,
        ms_per_token=1,
        output_tokens=10,
        rate_limit_rate=0.1,
        hang_rate=0.1,
        error_rate=0.2,
        malformed_rate=0.1,
        no_usage_rate=0.5,
    )
    rng = random.Random(9)
    plans = [plan_request(e, rng, 0) for _ in range(20_000)]
    share = {o: sum(p.outcome is o for p in plans) / len(plans) for o in Outcome}
    expected = {"rate_limited": 0.1, "hang": 0.1, "error": 0.2, "malformed": 0.1, "ok": 0.5}
    for outcome, want in expected.items():
        assert share[Outcome(outcome)] == pytest.approx(want, abs=0.015)
    assert sum(not p.usage for p in plans) / len(plans) == pytest.approx(0.5, abs=0.015)
    by = {p.outcome: p.delay_s for p in plans}
    assert by[Outcome.RATE_LIMITED] == 0
    assert by[Outcome.ERROR] == pytest.approx(0.010)
    assert by[Outcome.OK] == pytest.approx(0.020)


def test_windows_change_plans_at_their_time() -> None:
    """A window's overrides apply to requests arriving inside it, and only those."""
    e = endpoint(
        latency_ms=10, windows=[{"start_s": 5, "end_s": 6, "latency_x": 20, "error_rate": 1}]
    )
    rng = random.Random(1)
    before, inside, after = (plan_request(e, rng, t) for t in (4.9, 5.5, 6.0))
    assert (before.outcome, before.delay_s) == (Outcome.OK, pytest.approx(0.010))
    assert (inside.outcome, inside.delay_s) == (Outcome.ERROR, pytest.approx(0.200))
    assert (after.outcome, after.delay_s) == (Outcome.OK, pytest.approx(0.010))


def test_same_seed_same_plans() -> None:
    """The sequence of plans is a function of (seed, endpoint name) only."""
    e = endpoint(latency_ms={"median": 50, "p99": 150}, error_rate=0.3, no_usage_rate=0.3)

    def run(seed: int, name: str) -> list[Any]:
        rng = endpoint_rng(seed, name)
        return [plan_request(e, rng, 0) for _ in range(200)]

    assert run(7, "fast") == run(7, "fast")
    assert run(7, "fast") != run(8, "fast")
    assert run(7, "fast") != run(7, "slow")


def test_rng_is_stable_across_processes() -> None:
    """String seeding hashes with SHA-512, so this value never changes with PYTHONHASHSEED."""
    assert endpoint_rng(7, "fast").random() == 0.10211063971161705


def test_draws_do_not_depend_on_rates() -> None:
    """Changing a fault rate changes outcomes, never the latencies and lengths drawn."""
    calm = endpoint(latency_ms={"median": 50, "p99": 150}, output_tokens={"min": 1, "max": 99})
    stormy = endpoint(
        latency_ms={"median": 50, "p99": 150},
        output_tokens={"min": 1, "max": 99},
        malformed_rate=0.5,
    )
    a, b = random.Random(2), random.Random(2)
    for _ in range(100):
        x, y = plan_request(calm, a, 0), plan_request(stormy, b, 0)
        assert x.completion_tokens == y.completion_tokens
        assert x.usage == y.usage


# --- wire --------------------------------------------------------------------


def test_parse_chat() -> None:
    """Valid requests parse; each client error has OpenAI's status and shape."""
    models = ("m",)
    good = parse_chat(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', models)
    assert good == ChatCall(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=None
    )
    capped = parse_chat(
        b'{"model": "m", "messages": [{}], "max_tokens": 9, "max_completion_tokens": 5}', models
    )
    assert isinstance(capped, ChatCall)
    assert capped.max_tokens == 5
    cases = {
        b"{nope": 400,
        b"[]": 400,
        b'{"messages": [{}]}': 400,
        b'{"model": "m"}': 400,
        b'{"model": "m", "messages": []}': 400,
        b'{"model": "m", "messages": [{}], "stream": 1}': 400,
        b'{"model": "m", "messages": [{}], "stream_options": {"include_usage": true}}': 400,
        b'{"model": "m", "messages": [{}], "stream": true, "stream_options": []}': 400,
        b'{"model": "m", "messages": [{}], "max_tokens": 0}': 400,
        b'{"model": "other", "messages": [{}]}': 404,
    }
    for raw, status in cases.items():
        refusal = parse_chat(raw, models)
        assert isinstance(refusal, Refusal), raw
        assert refusal.status == status
        assert set(orjson.loads(refusal.body)["error"]) == {"message", "type", "param", "code"}
    missing = parse_chat(b'{"model": "other", "messages": [{}]}', models)
    assert isinstance(missing, Refusal)
    assert orjson.loads(missing.body)["error"]["code"] == "model_not_found"


def test_prompt_tokens_and_text() -> None:
    """Prompt tokens are about chars / 4; completion text is about 4 chars per token."""
    assert (
        prompt_tokens([{"content": "x" * 40}, {"content": [{"type": "text", "text": "y" * 40}]}])
        == 20
    )
    assert prompt_tokens([{"role": "user"}]) == 1
    assert len(completion_text("e", 1, 100)) == 400
    assert completion_text("e", 1, 100) == completion_text("e", 1, 100)
    assert len(completion_text("e", 1, 100_000)) == 400_000
