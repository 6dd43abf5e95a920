"""The benchmarks' pure helpers: percentiles, CDF points, scenario copies, targets, summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bench.harness as harness
from bench.overhead import compare, targets


def test_latency_summary_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    s = harness.latency_summary(values)
    assert s["count"] == 100
    assert s["p50_ms"] == 50.0 or s["p50_ms"] == 51.0
    assert s["p99_ms"] == 99.0 or s["p99_ms"] == 100.0
    assert s["max_ms"] == 100.0
    assert s["mean_ms"] == 50.5
    assert harness.latency_summary([]) == {"count": 0}


def test_cdf_points_are_monotone_and_end_at_one() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0] * 40
    points = harness.cdf_points(values, points=20)
    assert 2 <= len(points) <= 20
    xs = [p[0] for p in points]
    qs = [p[1] for p in points]
    assert xs == sorted(xs)
    assert qs == sorted(qs)
    assert points[-1] == [5.0, 1.0]
    assert harness.cdf_points([]) == []


def test_ephemeral_scenario_frees_every_port(tmp_path: Path) -> None:
    source = tmp_path / "src" / "demo.toml"
    source.parent.mkdir()
    source.write_text('seed = 1\n[[endpoints]]\nname = "a"\nport = 18101\n  port = 18102\n')
    copy = harness.ephemeral_scenario(source, tmp_path)
    assert "1810" not in copy.read_text()
    assert copy.read_text().count("port = 0") == 2


def test_result_path_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_RESULT_SUFFIX", raising=False)
    assert harness.result_path("burst").name == "burst.json"
    monkeypatch.setenv("BENCH_RESULT_SUFFIX", "_quick")
    assert harness.result_path("burst", "png").name == "burst_quick.png"
    assert harness.result_path("routing_quick").name == "routing_quick.json"


def _system(kind: str, max_jobs: float, cpu: float, p50: float, p99: float) -> dict[str, Any]:
    return {
        "kind": kind,
        "workers": 1,
        "max_jobs_per_s": max_jobs,
        "worker_cpu_s_per_1000_jobs": cpu,
        "open_loop": {
            "0.5": {"latency": {"count": 10, "p50_ms": p50, "p90_ms": p99, "p99_ms": p99}}
        },
    }


def test_compare_and_targets() -> None:
    result: dict[str, Any] = {
        "systems": {
            "echo": _system("ceiling", 2000, 0.25, 2.0, 5.0),
            "http-echo": _system("ceiling", 1000, 0.5, 3.0, 8.0),
            "llmq-1w": _system("llmq", 800, 0.7, 4.5, 20.0),
        }
    }
    result["comparison"] = compare(result)
    c = result["comparison"]["llmq-1w"]["http-echo"]
    assert c["throughput_ratio"] == 0.8
    assert c["cpu_ratio"] == 1.4
    assert c["added_at_0.5"] == {"p50_ms": 1.5, "p90_ms": 12.0, "p99_ms": 12.0}
    rows = {t["target"]: t for t in targets(result)}
    fair = [t for name, t in rows.items() if "http-echo" in name]
    assert [t["met"] for t in fair] == [True, True, False]  # ratio, p50, p99
    assert rows["1 worker jobs/s >= 70% of echo"]["met"] is False  # 40%


def test_summary_reads_result_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.__main__ import summary_rows

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.delenv("BENCH_RESULT_SUFFIX", raising=False)
    (tmp_path / "burst.json").write_text(
        json.dumps(
            {
                "jobs": 100,
                "workers": 1,
                "publish_per_s": 10.0,
                "drain_s": 3.0,
                "drain_per_s": 33.0,
                "worker_peak_rss_mb": [90.0],
                "lost": 0,
            }
        )
    )
    rows = summary_rows()
    lost = [r for r in rows if r["figure"] == "lost"]
    assert lost and lost[0]["met"] is True
