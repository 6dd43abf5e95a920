"""``llmq probe`` against the fake fleet (no broker needed)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
from harness import FLEET_KEY, running_fleet, write_worker_config

ROOT = Path(__file__).resolve().parents[2]


async def run_probe(config: Path, *args: str) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmq_cli",
        "probe",
        "--config",
        str(config),
        *args,
        cwd=ROOT,
        env={**env, "LLMQ_TEST_FLEET_KEY": FLEET_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_probe_measures_each_endpoint(tmp_path: Path) -> None:
    """Latency percentiles, error rate, failure kinds and tokens/s per endpoint; JSON and table."""
    async with running_fleet(
        {"name": "fast", "models": ["m1"], "latency_ms": 40, "output_tokens": 20},
        {"name": "flaky", "models": ["m1"], "latency_ms": 5, "error_rate": 0.5},
        {"name": "gone", "models": ["m1"]},
    ) as fleet:
        await fleet.set_down("gone", True)
        urls = {name: info.url for name, info in fleet.endpoints.items()}
        config = write_worker_config(
            tmp_path / "llmq.toml", "amqp://guest:guest@127.0.0.1:1/", {}, urls
        )
        code, out, err = await run_probe(config, "--json", "-n", "20", "-c", "4")
        stats = fleet.stats()
        table_code, table, _ = await run_probe(config, "--endpoint", "fast", "-n", "4")
    assert code == 1, err.decode()  # "gone" failed every request
    rows = {r["endpoint"]: r for r in orjson.loads(out)["endpoints"]}
    assert list(rows) == ["fast", "flaky", "gone"]
    fast = rows["fast"]
    assert (fast["model"], fast["requests"], fast["ok"], fast["error_rate"]) == ("m1", 20, 20, 0)
    assert 40 <= fast["p50_ms"] <= fast["p95_ms"] <= fast["p99_ms"] < 1000
    assert 10 < fast["tokens_per_s"] <= 20 / 0.040
    assert fast["throughput_tokens_per_s"] > fast["tokens_per_s"]  # 4 at a time
    flaky = rows["flaky"]
    assert 0.2 <= flaky["error_rate"] <= 0.8
    assert flaky["failures"] == {"server_error": flaky["errors"]}
    gone = rows["gone"]
    assert (gone["ok"], gone["p50_ms"], gone["failures"]) == (0, None, {"refused": 20})
    assert stats["fast"].requests == 20 and stats["flaky"].requests == 20
    assert table_code == 0
    text = table.decode()
    assert "fast" in text and "p95" in text and "flaky" not in text
