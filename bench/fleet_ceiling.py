"""How many requests per second the fake fleet serves at zero latency, on one core.

The fleet stands in for upstreams in the router's benchmarks, so its own
ceiling must sit well above what the router is asked to do, or the benchmark
measures the fake. The fleet runs in a subprocess pinned to CPU 0; the load
generator (aiohttp client on uvloop, and wrk when installed) runs on the
other CPUs. The server's own CPU time is read from /proc, so the result also
tells whether the server or the client was the bottleneck.

    .venv/bin/python -m bench.fleet_ceiling [--requests N] [--connections C]

Writes bench/results/fleet_ceiling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "workers" / "fleet" / "scenarios" / "zero.toml"
RESULT = ROOT / "bench" / "results" / "fleet_ceiling.json"
BODY = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "Say hi in 8 words."}]}
SERVER_CPU = 0

# Runs in the subprocess: the shipped scenario on a free port, on uvloop.
_LOW_LEVEL = """
import os, sys, uvloop
from workers.fleet import load_scenario, serve
os.sched_setaffinity(0, [{cpu}])
uvloop.run(serve(load_scenario(sys.argv[1]).with_ephemeral_ports()))
"""

# The same handler behind web.Application's router, for the comparison.
_APPLICATION = """
import asyncio, os, random, sys, uvloop
from aiohttp import web
from workers.fleet import load_scenario
from workers.fleet.server import Admin, EndpointServer
os.sched_setaffinity(0, [{cpu}])

async def main():
    endpoint = load_scenario(sys.argv[1]).endpoints[0]
    server = EndpointServer(endpoint, key=None, rng=random.Random(1), clock=lambda: 0.0,
                            host="127.0.0.1", admin=Admin(dict, lambda: None))
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server._chat)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(f"zero  http://127.0.0.1:{{port}}/v1  -", flush=True)
    print("fleet ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""

_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{body}'
"""


def start_fleet(variant: str) -> tuple[subprocess.Popen[str], str]:
    """Start the fleet subprocess; return it and the endpoint's base URL."""
    code = (_LOW_LEVEL if variant == "server" else _APPLICATION).format(cpu=SERVER_CPU)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(SCENARIO)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = ""
    for line in proc.stdout:
        if line.startswith("fleet ready"):
            return proc, url
        url = line.split()[1]
    raise RuntimeError("the fleet exited before it was ready")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def drive(url: str, requests: int, connections: int, max_s: float) -> dict[str, Any]:
    """Send ``requests`` POSTs over ``connections`` keep-alive connections."""
    payload = json.dumps(BODY).encode()
    headers = {"Content-Type": "application/json"}
    target = url + "/chat/completions"
    latencies: list[float] = []
    errors = 0
    remaining = requests
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_connection(deadline: float) -> None:
            nonlocal remaining, errors
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                start = time.perf_counter()
                async with session.post(target, data=payload, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - start)

        # Warm up: open every connection, let both sides settle.
        warm = time.perf_counter() + 1.0
        remaining = connections * 20
        await asyncio.gather(*(one_connection(warm) for _ in range(connections)))
        latencies.clear()
        remaining = requests
        began = time.perf_counter()
        await asyncio.gather(*(one_connection(began + max_s) for _ in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }


def run_python_client(
    proc: subprocess.Popen[str], url: str, requests: int, connections: int
) -> dict[str, Any]:
    """The aiohttp client on the other CPUs, plus the server's CPU use meanwhile."""
    others = (os.sched_getaffinity(0) - {SERVER_CPU}) or {SERVER_CPU}
    os.sched_setaffinity(0, others)
    before = cpu_seconds(proc.pid)
    result = uvloop.run(drive(url, requests, connections, max_s=10.0))
    server_cpu = cpu_seconds(proc.pid) - before
    result["server_cpu_s"] = round(server_cpu, 3)
    result["server_cpu_share"] = round(server_cpu / result["seconds"], 3)
    result["server_rps_per_cpu_s"] = round(result["requests"] / max(server_cpu, 1e-9), 1)
    return result


def run_wrk(
    proc: subprocess.Popen[str], url: str, connections: int, seconds: int
) -> dict[str, Any] | None:
    """wrk (C, one thread, on the other CPU) for a client that is surely not the limit."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    others = (os.sched_getaffinity(0) - {SERVER_CPU}) or {SERVER_CPU}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA.format(body=json.dumps(BODY)))
    pin = ["taskset", "-c", ",".join(map(str, sorted(others)))]
    cmd = [wrk, "-t1", f"-c{connections}", "--latency", "-s", script.name]
    target = url + "/chat/completions"
    try:
        subprocess.run([*pin, *cmd, "-d1s", target], capture_output=True, check=True)  # warm-up
        before = cpu_seconds(proc.pid)
        out = subprocess.run(
            [*pin, *cmd, f"-d{seconds}s", target],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        server_cpu = cpu_seconds(proc.pid) - before
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "command": f"wrk -t1 -c{connections} --latency -s post.lua -d{seconds}s URL",
        "rps": rps,
        "p50_ms": _wrk_ms(out, "50%"),
        "p99_ms": _wrk_ms(out, "99%"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "server_cpu_share": round(server_cpu / seconds, 3),
        "server_rps_per_cpu_s": round(rps * seconds / max(server_cpu, 1e-9), 1),
    }


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return round(float(match.group(1)) * scale, 3)


def measure(variant: str, requests: int, connections: int, wrk_s: int) -> dict[str, Any]:
    """Both clients against one fleet subprocess of the given server variant."""
    proc, url = start_fleet(variant)
    try:
        return {
            "python_client": run_python_client(proc, url, requests, connections),
            "wrk": run_wrk(proc, url, connections, wrk_s),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also measure the same handler behind web.Application",
    )
    args = parser.parse_args()
    variants = ["server", "application"] if args.compare else ["server"]
    load_before = os.getloadavg()  # a busy machine lowers every figure: keep it on record
    results = {v: measure(v, args.requests, args.connections, args.wrk_seconds) for v in variants}
    report = {
        "benchmark": "fleet_ceiling",
        "scenario": str(SCENARIO.relative_to(ROOT)),
        "connections": args.connections,
        "server_cpus": [SERVER_CPU],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "wrk": shutil.which("wrk") is not None,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": [round(x, 2) for x in load_before],
        "results": results,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(report, indent=2) + "\n")
    for variant, result in results.items():
        py = result["python_client"]
        print(
            f"{variant:<12} aiohttp client: {py['rps']:>8.0f} req/s  p50 {py['p50_ms']:.2f} ms"
            f"  p99 {py['p99_ms']:.2f} ms  server CPU {py['server_cpu_share']:.0%}"
            f"  ({py['server_rps_per_cpu_s']:.0f} req per server CPU-second)"
        )
        if result["wrk"]:
            w = result["wrk"]
            print(
                f"{variant:<12} wrk:            {w['rps']:>8.0f} req/s  p50 {w['p50_ms']:.2f} ms"
                f"  p99 {w['p99_ms']:.2f} ms  server CPU {w['server_cpu_share']:.0%}"
                f"  ({w['server_rps_per_cpu_s']:.0f} req per server CPU-second)"
            )
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
