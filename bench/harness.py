"""Shared pieces of the benchmarks: a private vhost, the fleet and workers as
processes, and process CPU/RSS readings from /proc. Every load is bounded."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SCENARIOS = REPO / "deploy" / "demo" / "scenarios"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL of a fresh vhost, deleted afterwards (the broker is shared)."""
    name = f"llmq-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{quote(name, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def fleet_process(scenario: Path, seed: int = 1) -> Iterator[dict[str, str]]:
    """Serve ``scenario`` in a subprocess; yields {endpoint name: base URL}."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.fleet", "--scenario", str(scenario), "--seed", str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    urls: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("fleet ready"):
                break
            name, url, *_ = line.split()
            urls[name] = url
        else:
            raise RuntimeError("the fleet exited before it was ready")
        yield urls
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_config(
    path: Path, amqp_url: str, endpoints: dict[str, str], models: list[str], **worker: Any
) -> Path:
    lines = ["[broker]", f'url = "{amqp_url}"', "[worker]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in worker.items()]
    for name, url in endpoints.items():
        lines += [
            "[[endpoints]]",
            f'name = "{name}"',
            f'base_url = "{url}"',
            f"models = {json.dumps(models)}",
            "max_concurrency = 4096",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_worker(config: Path, name: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    return subprocess.Popen(
        [sys.executable, "-m", "producers", "worker", "--config", str(config), "--name", name],
        env=env,
        stderr=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mb(pid: int, peak: bool = False) -> float:
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def environment() -> dict[str, Any]:
    versions = {}
    for dist in ("aio-pika", "aiormq", "aiohttp", "httpx", "orjson", "uvloop", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), **data}, indent=2) + "\n"
    )
    return path
