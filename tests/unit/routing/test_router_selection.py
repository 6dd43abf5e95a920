"""Router.pick: predicted latency, soft load, floors, cold probes, failure cost, limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from schemas.errors import ErrorCode
from schemas.settings import ModelSettings
from workers.routing import (
    Choice,
    EndpointSpec,
    FailureKind,
    NoChoice,
    P2CPolicy,
    RoutingConfig,
    Work,
)

Make = Callable[..., Any]


def warm(h: Any, latencies: dict[str, float], rounds: int = 20, tokens: int = 200) -> None:
    """Interleaved history so that every endpoint's last sample is recent."""
    for _ in range(rounds):
        for name, latency in latencies.items():
            h.serve(name, latency, tokens=tokens, gap_s=0.001)


def predicted(h: Any, name: str, work: Work | None = None) -> float:
    rows = h.router.explain("m", work=work or Work(100, 200), now=h.now)
    [row] = [c for c in rows if c.name == name]
    return float(row.predicted_s)


def test_lowest_predicted_latency_wins(make: Make) -> None:
    h = make(["a", "b", "c"])
    warm(h, {"a": 0.3, "b": 0.1, "c": 0.2})
    assert h.shares(20) == {"b": 20}
    choice = h.choose()
    assert choice.model == "m"
    assert choice.upstream_model == "m"
    assert choice.predicted_s == pytest.approx(0.1, rel=0.05)


def test_load_is_soft_until_capacity(make: Make) -> None:
    """20 in flight on a 64-slot endpoint barely matter; (in_flight + 1) would have moved."""
    h = make(["fast", "slow"])
    warm(h, {"fast": 0.1, "slow": 0.3})
    for _ in range(20):
        h.begin("fast")
    assert h.choose().endpoint == "fast"  # 0.1 · (1 + 20/64) < 0.3; 0.1 · 21 would not be
    for _ in range(44):
        h.begin("fast")
    assert h.choose().endpoint == "slow"  # 64/64: the hard limit


def test_load_term_moves_traffic_as_capacity_fills(make: Make) -> None:
    """0.2 s vs 0.3 s: switch when 0.2 · (1 + n/64) passes 0.3, near n = 32."""
    h = make(["a", "b"])
    warm(h, {"a": 0.2, "b": 0.3})
    moved_at = None
    for n in range(64):
        if h.choose().endpoint == "b":
            moved_at = n
            break
        h.begin("a")
    assert moved_at is not None
    assert 28 <= moved_at <= 36


def test_oldest_pending_request_raises_the_estimate(make: Make) -> None:
    """A request running 10× its usual time shows before any response returns."""
    h = make(["a", "b"])
    warm(h, {"a": 0.1, "b": 0.3})
    h.begin("a")
    assert h.choose().endpoint == "a"
    h.tick(1.0)
    assert predicted(h, "a") == pytest.approx(1.0, rel=0.05)
    assert h.choose().endpoint == "b"


def test_oldest_pending_request_counts_only_past_the_p95(make: Make) -> None:
    """Answers in 0.1 or 0.2 s: a request at 0.19 s is usual, one at 0.6 s is not."""
    h = make(["a"])
    for _ in range(20):
        h.serve("a", 0.1, gap_s=0.001)
        h.serve("a", 0.2, gap_s=0.001)
    idle = predicted(h, "a")
    h.begin("a")
    h.tick(0.19)
    assert predicted(h, "a") == pytest.approx(h.router._states["a"].latency.level * 0.15, rel=0.1)
    assert predicted(h, "a") < 0.2
    h.tick(0.41)
    assert predicted(h, "a") == pytest.approx(0.6 / 1.33, rel=0.1)  # 0.6 s ÷ the p95 ratio
    assert idle < 0.2


def test_idle_estimates_decay_but_a_probe_does_not_draw_a_herd(make: Make) -> None:
    """An avoided endpoint wins one pick after idling long enough; while it runs, its level applies.

    b is 10× slower: its idle level fades toward 0 with explore_s = 60 s, so it
    is worth a probe after 60 · ln 10 ≈ 138 s.
    """
    h = make(["a", "b"])
    warm(h, {"a": 0.1, "b": 1.0})
    h.tick(120.0)
    assert h.choose().endpoint == "a"  # not yet: 10 · exp(−2) > 1
    h.tick(80.0)
    h.begin("a")  # a is busy, so a keeps its undecayed level
    assert h.choose().endpoint == "b"
    h.begin("b")
    assert predicted(h, "b") == pytest.approx(1.0, rel=0.05)
    assert h.shares(10) == {"a": 10}


def test_retries_and_hedges_do_not_explore(make: Make) -> None:
    """A long-idle slower endpoint may win a first pick (a probe), never a retry's."""
    h = make(["a", "b", "c"])
    warm(h, {"a": 0.1, "b": 0.5, "c": 1.0})
    h.tick(120.0)
    h.begin("a")  # busy: a keeps its level; b's has faded by exp(-2)
    assert h.choose().endpoint == "b"
    retry = h.pick(exclude=frozenset({"c"}))
    assert isinstance(retry, Choice) and retry.endpoint == "a"


def test_cold_endpoint_is_probed_first_and_once(make: Make) -> None:
    """No history: tried at once; with its probe out, warm endpoints come first."""
    h = make(["a", "b", "new"])
    warm(h, {"a": 0.1, "b": 0.2})
    assert h.choose().endpoint == "new"
    probe = h.begin("new")
    assert h.shares(10) == {"a": 10}
    assert predicted(h, "new") == pytest.approx(0.1, rel=0.1)  # the fleet's best shape
    h.tick(0.15)
    h.router.succeed(probe, now=h.now, output_tokens=200)
    assert h.status("new").samples == 1


def test_a_cold_start_burst_waits_for_the_first_answers(make: Make) -> None:
    """At start-up every endpoint is cold: one probe each; the rest of a burst
    waits for an answer (a capacity reason) instead of herding onto endpoints
    nobody has heard from, one of which may hang."""
    h = make(["a", "b", "c"])
    for _ in range(3):
        h.begin(h.choose().endpoint)
    assert [s.in_flight for s in h.router.snapshot(now=h.now)] == [1, 1, 1]
    waiting = h.pick()
    assert isinstance(waiting, NoChoice)
    assert waiting.code is ErrorCode.OVER_CAPACITY
    assert waiting.retry_at is None  # frees on a completion
    assert "a=cold_probe" in waiting.reason
    h.serve("b", 0.1)  # b answers: now warm, it takes the next jobs
    assert h.choose().endpoint == "b"


def test_cold_estimate_uses_the_prior_without_any_history(make: Make) -> None:
    h = make(["a"])
    cfg = RoutingConfig()
    assert h.choose().predicted_s == pytest.approx(cfg.prior_base_s + cfg.prior_per_token_s * 200)


def test_long_generations_do_not_make_an_endpoint_look_slow(make: Make) -> None:
    """Same speed per token, one serves long answers, one short: same prediction per job."""
    h = make(["long", "short"])
    for i in range(30):
        n_long, n_short = (800, 1200)[i % 2], (20, 80)[i % 2]
        h.serve("long", 0.2 + 0.01 * n_long, tokens=n_long, gap_s=0.001)
        h.serve("short", 0.2 + 0.01 * n_short, tokens=n_short, gap_s=0.001)
    for name in ("long", "short"):
        status = h.status(name)
        assert status.base_s == pytest.approx(0.2, rel=0.05)
        assert status.per_token_s == pytest.approx(0.01, rel=0.02)
        assert status.level == pytest.approx(1.0, abs=0.01)
    # Both busy (no idle decay): the same prediction for the same 200-token job.
    h.begin("long")
    h.begin("short")
    work = Work(100, 200)
    assert predicted(h, "long", work) == pytest.approx(2.2, rel=0.02)
    assert predicted(h, "short", work) == pytest.approx(2.2, rel=0.02)


def test_prediction_uses_the_typical_output_below_the_cap(make: Make) -> None:
    """max_tokens 4000 but answers are ~100 tokens: predict ~100, not 4000."""
    h = make(["a"])
    for n in (50, 150) * 20:
        h.serve("a", 0.2 + 0.01 * n, tokens=n, gap_s=0.001)
    assert h.choose(work=Work(10, 4000)).predicted_s == pytest.approx(1.2, rel=0.05)
    assert h.choose(work=Work(10, None)).predicted_s == pytest.approx(1.2, rel=0.05)
    assert h.choose(work=Work(10, 20)).predicted_s == pytest.approx(0.4, rel=0.05)


def test_fast_endpoint_with_some_fast_errors_is_still_preferred(make: Make) -> None:
    """5% fast 5xx add ~5% of 50 ms; a clean endpoint 3× slower stays behind."""
    h = make(["flaky", "clean"])
    for i in range(200):
        if i % 20 == 0:
            h.failing("flaky", FailureKind.SERVER_ERROR, elapsed_s=0.05)
        else:
            h.serve("flaky", 0.1, gap_s=0.001)
        if i % 2 == 0:
            h.serve("clean", 0.3, gap_s=0.001)
    assert h.status("flaky").state == "closed"
    assert predicted(h, "flaky") > 0.1
    assert h.shares(20) == {"flaky": 20}


def test_hanging_endpoint_is_avoided(make: Make) -> None:
    """Fast when it answers, but 20% of calls hang for 30 s: expected cost ~6 s."""
    h = make(["hangs", "steady"])
    for i in range(60):
        h.serve("hangs", 0.1, gap_s=0.001)
        h.serve("steady", 0.3, gap_s=0.001)
        if i % 5 == 0:
            attempt = h.begin("hangs")
            h.router.fail(replace(attempt, started=h.now - 30.0), FailureKind.TIMEOUT, now=h.now)
    assert h.status("hangs").state == "closed"  # not ejected: the cost does the work
    assert predicted(h, "hangs") > 3.0
    assert h.shares(20) == {"steady": 20}


def test_max_concurrency_is_a_hard_limit(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m"}, max_concurrency=2)])
    h.serve("a", 0.1)  # warm, so the cold-probe limit is not what stops it
    h.begin("a")
    assert isinstance(h.pick(), Choice)
    h.begin("a")
    refused = h.pick()
    assert isinstance(refused, NoChoice)
    assert refused.code is ErrorCode.OVER_CAPACITY
    assert refused.retry_at is None  # frees on a completion, not at a known time
    assert "a=busy" in refused.reason


def test_rpm_counts_any_60s_window(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m"}, 64, rpm=2)])
    start = h.now
    h.serve("a", 0.1, gap_s=0.0)  # warm (and one of the two requests this minute)
    h.begin("a")
    refused = h.pick()
    assert isinstance(refused, NoChoice)
    assert refused.code is ErrorCode.OVER_CAPACITY
    assert "a=rate_limit" in refused.reason
    assert refused.retry_at == pytest.approx(start + 60.0)  # when the first request leaves
    h.tick(30.0)
    assert isinstance(h.pick(), NoChoice)  # a refilling bucket would have had one by now
    h.now = start + 60.0
    assert isinstance(h.pick(), Choice)


def test_tpm_reserves_prompt_plus_cap_and_refunds_unused(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m"}, 64, tpm=1000)])
    work = Work(100, 200)  # reserves 300
    attempts = [h.begin("a", work) for _ in range(3)]
    assert isinstance(h.pick(work=work), NoChoice)  # 100 left
    h.router.succeed(attempts[0], now=h.now, output_tokens=50)  # 150 back
    assert isinstance(h.pick(work=work), NoChoice)  # 250 < 300
    h.router.fail(attempts[1], FailureKind.REFUSED, now=h.now)  # never reached: all 300 back
    assert isinstance(h.pick(work=work), Choice)
    h.router.fail(attempts[2], FailureKind.SERVER_ERROR, now=h.now)  # counted as used
    refused = h.pick(work=Work(5000, None))  # more than the whole limit: waits for an empty window
    assert isinstance(refused, NoChoice)
    assert refused.retry_at == pytest.approx(h.now + 60.0)


def test_a_refund_returns_the_attempts_own_tokens_not_a_later_ones(make: Make) -> None:
    """A refused attempt whose reservation has already left the window frees nothing:
    the tokens in the window now are other attempts', really sent."""
    h = make([EndpointSpec("a", {"m": "m"}, 64, tpm=600)])
    work = Work(100, 200)  # reserves 300
    old = h.begin("a", work)
    h.tick(30.0)
    h.begin("a", work)
    h.tick(31.0)  # old's entry left the window
    h.begin("a", work)  # the window is full again
    h.router.fail(old, FailureKind.REFUSED, now=h.now)
    assert isinstance(h.pick(work=work), NoChoice)


def test_rpm_refund_on_refused(make: Make) -> None:
    h = make([EndpointSpec("a", {"m": "m"}, 64, rpm=1)])
    h.failing("a", FailureKind.REFUSED, elapsed_s=0.0)
    assert isinstance(h.pick(), Choice)


def test_aliases_and_fallbacks(make: Make) -> None:
    models = {
        "m": ModelSettings(aliases=["alias"], fallbacks=["n"]),
        "virtual": ModelSettings(aliases=["v"], fallbacks=["n"]),
        "ghost": ModelSettings(aliases=["g"]),
    }
    h = make(
        [EndpointSpec("a", {"m": "m-at-a"}, 1), EndpointSpec("b", {"n": "n-at-b"}, 64)],
        models=models,
    )
    r = h.router
    assert (r.resolve("alias"), r.resolve("m"), r.resolve("n")) == ("m", "m", "n")
    assert (r.resolve("virtual"), r.resolve("v")) == ("virtual", "virtual")
    assert r.resolve("ghost") is None and r.resolve("g") is None and r.resolve("x") is None
    first = h.choose("alias")
    assert (first.endpoint, first.model, first.upstream_model, first.via) == (
        "a",
        "m",
        "m-at-a",
        None,
    )
    h.failing("a", FailureKind.SERVER_ERROR, count=5, model="m")  # a is ejected now
    fallback = h.choose("alias")
    assert (fallback.endpoint, fallback.model, fallback.upstream_model) == ("b", "n", "n-at-b")
    assert fallback.via == "fallback"
    assert h.choose("v").endpoint == "b"
    assert h.choose("v").via == "fallback"  # a virtual model is always served by a fallback
    # The fallback's endpoint excluded (tried): the whole chain is down, so the
    # ejected endpoint is used after all (panic, the last resort).
    last = h.pick("m", exclude=frozenset({"b"}))
    assert isinstance(last, Choice) and (last.endpoint, last.via) == ("a", None)
    excluded = h.pick("m", exclude=frozenset({"a", "b"}))
    assert isinstance(excluded, NoChoice)
    assert excluded.code is ErrorCode.NO_HEALTHY_ENDPOINT
    assert "a=excluded" in excluded.reason and "b=excluded" in excluded.reason
    unknown = h.pick("nope")
    assert isinstance(unknown, NoChoice) and unknown.code is ErrorCode.UNKNOWN_MODEL


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"m": ModelSettings(fallbacks=["zzz"])}, "fallback 'zzz' of 'm' has no endpoint"),
        ({"m": ModelSettings(aliases=["n"])}, "alias 'n' of 'm' is already"),
        ({"m": ModelSettings(aliases=["x"]), "n": ModelSettings(aliases=["x"])}, "alias 'x'"),
    ],
)
def test_inconsistent_models_are_refused(make: Make, models: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make([EndpointSpec("a", {"m": "m", "n": "n"}, 1)], models=models)


def test_duplicate_endpoint_names_are_refused(make: Make) -> None:
    with pytest.raises(ValueError, match="used twice"):
        make(["a", "a"])


def test_explain_lists_every_candidate_with_cost_or_reason(make: Make) -> None:
    models = {"m": ModelSettings(fallbacks=["n"])}
    h = make(
        [
            EndpointSpec("a", {"m": "m"}, 1),
            EndpointSpec("b", {"m": "m"}, 64),
            EndpointSpec("c", {"n": "n"}, 64),
        ],
        models=models,
    )
    warm(h, {"a": 0.1, "b": 0.2, "c": 0.3}, rounds=3)
    h.begin("a")
    rows = h.router.explain("m", work=Work(10, 100), now=h.now)
    assert [(c.name, c.model, c.skip) for c in rows] == [
        ("a", "m", "busy"),
        ("b", "m", None),
        ("c", "n", None),
    ]
    assert all(c.cost > 0 and c.predicted_s > 0 for c in rows)
    assert h.router.explain("unknown", work=Work(10, 100), now=h.now) == []


def test_policy_is_pluggable(make: Make) -> None:
    h = make(["a", "b", "c"], policy=P2CPolicy())
    warm(h, {"a": 0.1, "b": 0.2, "c": 0.3})
    shares = h.shares(300)
    assert "c" not in shares  # P2C never picks the worst of three
    assert shares["a"] > shares["b"]
    assert "policy=p2c" in repr(h.router)


def test_unknown_endpoint_is_a_caller_bug(make: Make) -> None:
    h = make(["a"])
    with pytest.raises(ValueError, match="unknown endpoint 'zz'"):
        h.begin("zz")
    assert h.router.endpoints == ("a",)


def test_explain_shows_a_cold_probe_that_outlived_the_estimate(make: Make) -> None:
    """A cold endpoint's probe out longer than the estimate: explain says so, with its age."""
    h = make(["a"])
    h.begin("a")
    h.tick(60.0)
    [candidate] = h.router.explain("m", work=Work(10, 200), now=h.now)
    assert candidate.skip == "cold_probe"
    assert candidate.predicted_s == pytest.approx(60.0, abs=0.5)
