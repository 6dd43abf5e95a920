"""The routing benchmark's pure parts: the job stream, scenario copies, the lower
bound, per-run summaries and the target verdicts."""

from __future__ import annotations

import math
from pathlib import Path

from bench.routing_report import summarize, table, targets
from bench.routing_routers import LatencyMinPick, Outcome, RoundRobinPick
from bench.routing_stream import (
    FULL_S,
    LEAD_S,
    healthy_reference,
    job_stream,
    lower_bound,
    prepare_scenario,
    windows_in_stream,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "scenarios"


def test_job_stream_is_seeded_poisson_and_bounded() -> None:
    a, b = job_stream(1, 50.0, 10.0), job_stream(1, 50.0, 10.0)
    assert a == b
    assert a != job_stream(2, 50.0, 10.0)
    assert 400 < len(a) < 600
    assert all(0 <= j.at < 10.0 for j in a)
    assert [j.at for j in a] == sorted(j.at for j in a)
    assert {j.max_tokens for j in a} <= {64, 128, 256, 512}


def test_prepare_scenario_sets_ports_and_compresses_windows(tmp_path: Path) -> None:
    full = prepare_scenario(SCENARIOS / "routing_spike.toml", tmp_path / "a.toml", FULL_S)
    assert all(e.port > 0 for e in full.endpoints)
    window = full.endpoint("e60").windows[0]
    assert (window.start_s, window.end_s, window.every_s) == (2.5, 4.5, 5.0)
    quick = prepare_scenario(SCENARIOS / "routing_spike.toml", tmp_path / "b.toml", FULL_S / 4)
    window = quick.endpoint("e60").windows[0]
    assert math.isclose(window.start_s, LEAD_S + 0.5)
    assert math.isclose(window.end_s, LEAD_S + 1.0)
    assert math.isclose(window.every_s or 0, 1.25)
    spans = windows_in_stream(full, FULL_S)["e60"]
    assert spans[0] == (2.0, 4.0, "x20")
    assert spans[1] == (7.0, 9.0, "x20")
    assert len(spans) == 2  # the next window opens at stream second 12, when the stream ends


def test_lower_bound_skips_down_endpoints_and_names_the_healthy_reference(
    tmp_path: Path,
) -> None:
    jobs = job_stream(3, 50.0, FULL_S)
    outage = prepare_scenario(SCENARIOS / "routing_outage.toml", tmp_path / "o.toml", FULL_S)
    ref = healthy_reference(outage)
    assert ref is not None and ref.name == "e120"
    bound = lower_bound(outage, jobs, 3)
    assert len(bound["best"]) == len(bound["reference"]) == len(jobs)
    down = [b for j, b in zip(jobs, bound["best"], strict=True) if 3.0 <= j.at < 7.0]
    up = [b for j, b in zip(jobs, bound["best"], strict=True) if j.at >= 7.0]
    # while e60 is down the best is e120, slower: medians 120 ms + tokens vs 60 ms + tokens
    assert sorted(down)[len(down) // 2] > sorted(up)[len(up) // 2]
    steady = prepare_scenario(SCENARIOS / "routing_steady.toml", tmp_path / "s.toml", FULL_S)
    ref = healthy_reference(steady)
    assert ref is not None and ref.name == "e60"


def test_baseline_policies() -> None:
    import random

    rr = RoundRobinPick(["a", "b", "c"])
    assert [rr.pick(["a", "b", "c"]) for _ in range(4)] == ["a", "b", "c", "a"]
    assert rr.pick(["c"]) == "c"
    lm = LatencyMinPick(["a", "b"], random.Random(1))
    lm.observe("a", 0.1)
    assert lm.pick(["a", "b"]) == "b"  # unseen counts as 0: tried first
    lm.observe("b", 0.3)
    assert lm.pick(["a", "b"]) == "a"
    lm.observe("a", 1.1)  # EWMA: 0.1 + 0.2 * (1.1 - 0.1) = 0.3, a tie at 0.3
    assert lm.pick(["a"]) == "a"


def _fleet(requests: dict[str, int]) -> dict[str, object]:
    return {
        "endpoints": {
            n: {"requests": r, "by_status": {"200": r}, "outcomes": {"ok": r}}
            for n, r in requests.items()
        }
    }


def test_summary_counts_failures_as_never_answered_and_targets_compare() -> None:
    jobs = job_stream(1, 50.0, 4.0)
    n = len(jobs)
    good = [(0.1, Outcome(True, "a", 1))] * n
    bad = [(0.2, Outcome(True, "b", 1))] * (n - 5) + [(3.5, Outcome(False, error="x"))] * 5
    kw = {"sla_s": 3.0, "duration_s": 4.0, "endpoints": ["a", "b"], "lag_s": [0.0]}
    mine = summarize(jobs, good, _fleet({"a": n, "b": 0}), **kw)  # type: ignore[arg-type]
    other = summarize(jobs, bad, _fleet({"a": 0, "b": n + 10}), **kw)  # type: ignore[arg-type]
    assert mine["success_pct"] == 100 and mine["p99_ms"] == 100.0
    assert other["p99_ms"] is None  # 5 of ~200 never answered: p99 is a failure
    assert other["upstream_calls_per_job"] > 1
    assert other["served_share_pct"]["b"] == 100.0
    scenario = {
        "endpoints": ["a", "b"],
        "lower_bound": {"p50_ms": 50.0, "p99_ms": 90.0},
        "reference": {"endpoint": "a", "p99_ms": 80.0},
        "routers": {"llmq": mine, "latency_min": other},
    }
    t = targets(scenario)
    assert t["best_p99"]["met"] and t["best_deadline_met"]["met"]
    assert t["calls_per_job_le_1_3"]["met"]
    assert t["p99_within_1_5x_healthy"]["met"]  # 100 <= 1.5 * 80
    assert t["all_met"]
    scenario["targets"] = t
    assert "llmq targets" in table("toy", scenario)
