"""The streaming peers benchmark's verdict (llmq's gateway against LiteLLM Proxy),
its summary rows, and the config it gives llmq's worker and gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench_main
from bench.gateway_system import _config
from bench.open_loop import added
from bench.stream_peers_report import versus
from schemas.settings import load_settings


def _system(
    extra_ms: float, cpu: float, sustained: tuple[float | None, float | None]
) -> dict[str, Any]:
    phases = {}
    for mode in ("plain", "stream"):
        for rate in (100, 500):
            row: dict[str, Any] = {
                "success": 1.0,
                "total_p50_ms": 210 + extra_ms,
                "total_p99_ms": 230 + extra_ms,
                "cpu_ms_per_request": cpu,
                "cpu_ms_per_request_by_process": {"gateway": cpu / 2, "worker": cpu / 2},
            }
            if mode == "stream":
                row |= {"ttft_p50_ms": 50 + extra_ms, "ttft_p99_ms": 60 + extra_ms}
            phases[f"{mode}@{rate}"] = row
    return {
        "phases": phases,
        "max_sustained_per_s": dict(zip(("plain", "stream"), sustained, strict=True)),
    }


def _result(gateway_ms: float, litellm_ms: float) -> dict[str, Any]:
    systems = {
        "direct": _system(0, 0.1, (2000, 2000)),
        "llmq-gateway": _system(gateway_ms, 2.0, (2000, 300)),
        "litellm-proxy": _system(litellm_ms, 6.0, (2000, None)),
    }
    for s in systems.values():
        s["added"] = {k: added(v, systems["direct"]["phases"][k]) for k, v in s["phases"].items()}
    return {"plan": {"ladder": [10, 20], "rates": [100, 500]}, "systems": systems}


def test_lower_latency_and_cpu_win_and_a_tie_at_the_top_is_not_a_loss() -> None:
    rows = {r["figure"]: r for r in versus(_result(3, 10), "llmq-gateway", "litellm-proxy")}
    assert rows["stream@100 ttft_p50 added"]["met"] is True
    assert rows["plain@100 cpu_ms_per_request"]["met"] is True
    assert rows["plain max_sustained"]["met"] is True  # 2000 = 2000, the ladder's top
    assert rows["stream max_sustained"]["litellm-proxy"] == 0.0  # not even the first step
    assert rows["stream@500 success"]["met"] is True
    slower = {r["figure"]: r for r in versus(_result(10, 10), "llmq-gateway", "litellm-proxy")}
    assert slower["stream@100 ttft_p99 added"]["met"] is False  # equal latency: not beaten


def test_versus_without_the_peer_is_empty() -> None:
    assert versus(_result(3, 10), "llmq-gateway", "litellm-tuned") == []


def test_summary_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _result(3, 10)
    monkeypatch.setattr(
        bench_main, "_load", lambda name: result if name == "stream_peers" else None
    )
    rows = bench_main._stream_peers_rows()
    assert [r["met"] for r in rows] == [True] * 6
    assert rows[0]["value"] == "+3.0 vs +10.0 ms"
    assert rows[3]["value"] == "300 vs <10"
    assert rows[4]["value"] == "2.00 (1.00) vs 6.00"


def test_llmq_config_names_the_fleet_key_variable_not_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_FLEET_KEY", "sk-fleet")
    monkeypatch.setenv("BENCH_GATEWAY_KEYS", "sk-gw")
    path = _config(
        tmp_path / "llmq.toml", "amqp://guest:guest@127.0.0.1:5672/x", "http://127.0.0.1:1/v1", 5555
    )
    assert "sk-fleet" not in path.read_text()
    settings = load_settings(path)
    key = settings.endpoints[0].api_key
    assert key is not None and key.get_secret_value() == "sk-fleet"
    assert settings.gateway.port == 5555
    assert settings.worker.concurrency == 1024


def test_summary_rows_when_no_stream_of_the_peer_succeeded(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _result(3, 10)
    for key in ("ttft_p50_ms", "ttft_p99_ms"):
        del result["systems"]["litellm-proxy"]["added"]["stream@100"][key]
    monkeypatch.setattr(
        bench_main, "_load", lambda name: result if name == "stream_peers" else None
    )
    rows = bench_main._stream_peers_rows()
    assert rows[0]["value"] == "+3.0 vs none ok ms"
    assert rows[0]["met"] is None
