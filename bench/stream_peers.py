"""llmq's gateway and LiteLLM Proxy against calling the fleet directly, streamed
and not (issue 15, item 6).

One fake endpoint (bench/scenarios/stream_peers.toml: 50 ms to the first
token, then 32 tokens 5 ms apart) and, in front of it, each *system*: the
endpoint itself (``direct``, the ceiling), llmq's gateway (one ``llmq
gateway`` and one ``llmq worker`` process on a private vhost,
bench/gateway_system.py: the durable hop), LiteLLM Proxy (``litellm[proxy]``
from the bench venv, one process as ``litellm --config`` starts it, an
``openai/`` deployment pointing at the fleet, a throwaway master key) and any
system added with ``--system``. The same open-loop load (bench/open_loop.py)
runs against each, one system after the other:

- at each of ``--rates`` (100 and 500 requests/s), not streamed and streamed:
  success rate, p50/p99 of the whole answer and of the time to the first
  token, and those minus the direct call's (the *added* latency); CPU
  milliseconds per request of the system's processes (from /proc, children
  included): for llmq the gateway's and the worker's together (the broker's
  is not counted), each also on its own;
- a ramp up ``--ladder`` per mode, stopping at the first step under 99 %
  success (a request succeeds when it gets a complete answer within
  ``--timeout``): the highest rate sustained.

Then a side-by-side table (bench/stream_peers_report.py) and, for llmq
against each LiteLLM configuration, every figure with whether llmq beats it
(``versus`` in the JSON; the issue wants all of them).

Nothing leaves 127.0.0.1: LiteLLM reads its bundled cost map and other
tables (``LITELLM_LOCAL_*``), HTTP(S)_PROXY points at a closed loopback port
for anything that would try, and the proxy's sockets are checked for a
non-loopback peer after its run (``external_peers`` in the result).

    python -m bench stream_peers [--quick]
    python -m bench.stream_peers --system name=other,url=http://127.0.0.1:8080/v1,pid=1234,key_env=KEY \\
        --fleet-url http://127.0.0.1:18150/v1   # another system, on a fleet you started

A system added with ``--system`` must serve model ``gpt-4.1-mini`` from the
same fleet (hence ``--fleet-url``); from Python, pass a :data:`SystemFactory`
to :func:`run`, which gets the fleet's URL and key and yields a System.

``--no-llmq`` leaves llmq out. ``--litellm tuned`` (or ``both``) also runs LiteLLM with its per-chunk stream
logging off (``disable_streaming_logging``), the documented switch for its
streaming CPU cost. ``--quick``: about 75 s, LiteLLM's start-up (~30 s of
imports on this machine) overlapping the direct calls, llmq measured last;
0.5 s per rate and a 1.5 s timeout, so its figures are a smoke test only. A
full run (10 s per rate, 5 s per ramp step, 10 s timeout) takes about 5
minutes per LiteLLM configuration and as long again for llmq (its overloaded
phases wait out their timeouts and then for the system to go idle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp

from bench import gateway_system
from bench.gateway_overhead import free_port
from bench.harness import REPO, fleet_with_pid, quick_results, save, stop_process
from bench.open_loop import (
    System,
    added,
    cpu_by_process,
    open_loop,
    remote_peers,
    request_body,
    summarize,
    tree_cpu_seconds,
)
from bench.stream_peers_report import print_table, versus

MODEL = "gpt-4.1-mini"
SCENARIO = REPO / "bench" / "scenarios" / "stream_peers.toml"
MAX_TOKENS = 32
SystemFactory = Callable[[str, str], contextlib.AbstractContextManager[System]]
"""(fleet base URL, fleet key) -> a context manager that runs a system and yields it."""

# Offline tables instead of fetches at start-up; no proxy for loopback, a dead
# one for everything else.
LITELLM_ENV = {
    **{
        f"LITELLM_LOCAL_{t}": "True"
        for t in (
            "MODEL_COST_MAP",
            "BLOG_POSTS",
            "POLICY_TEMPLATES",
            "AUTOROUTER_PRESETS",
            "ANTHROPIC_BETA_HEADERS",
        )
    },
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


@dataclass(frozen=True, slots=True)
class Plan:
    rates: tuple[float, ...] = (100, 500)
    seconds: float = 10.0
    ladder: tuple[float, ...] = (10, 20, 50, 100, 200, 300, 500, 700, 1000, 1400, 2000)
    ramp_seconds: float = 5.0
    timeout_s: float = 10.0
    warmup_s: float = 2.0
    settle_max_s: float = 30.0
    overlap_startup: bool = False
    """Measure each system as soon as it is ready (quick), not once all are."""


QUICK = Plan(
    seconds=0.5, ladder=(20,), ramp_seconds=0.5, timeout_s=1.5, warmup_s=0.5, settle_max_s=1.5,
    overlap_startup=True,
)  # fmt: skip


@contextlib.contextmanager
def direct(fleet_url: str, key: str) -> Iterator[System]:
    yield System("direct", fleet_url, key)


def litellm_proxy(tuned: bool = False) -> SystemFactory:
    """LiteLLM Proxy on a free loopback port, configured for the fleet; started,
    not yet ready (its imports take tens of seconds). ``tuned`` turns off its
    per-chunk logging of streams (``disable_streaming_logging``, the documented
    switch; this proxy has no callbacks or database that would consume it)."""
    return functools.partial(_litellm_proxy, tuned)


@contextlib.contextmanager
def _litellm_proxy(tuned: bool, fleet_url: str, key: str) -> Iterator[System]:
    master = f"sk-bench-{secrets.token_hex(16)}"  # this run's only, never printed
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {fleet_url}\n"
            "      api_key: os.environ/BENCH_FLEET_KEY\n"
            "router_settings:\n  num_retries: 0\n"
            "general_settings:\n  master_key: os.environ/BENCH_LITELLM_MASTER_KEY\n"
            + ("litellm_settings:\n  disable_streaming_logging: true\n" if tuned else "")
        )
        env = {**os.environ, **LITELLM_ENV, "BENCH_FLEET_KEY": key}
        env["BENCH_LITELLM_MASTER_KEY"] = master
        log = (Path(tmp) / "litellm.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(config),
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip
        try:
            name = "litellm-tuned" if tuned else "litellm-proxy"
            yield System(name, f"http://127.0.0.1:{port}/v1", master, proc.pid)
        finally:
            stop_process(proc)
            log.close()
            if proc.returncode not in (0, -15):
                tail = (Path(tmp) / "litellm.log").read_text(errors="replace")[-2000:]
                print(f"litellm exited {proc.returncode}:\n{tail.replace(master, '***')}")


async def ready(http: aiohttp.ClientSession, system: System, wait_s: float = 180) -> float:
    """Seconds until a small non-streamed call succeeds."""
    t0 = time.perf_counter()
    body = request_body(MODEL, False, 4)
    headers = {"Authorization": f"Bearer {system.api_key}", "Content-Type": "application/json"}
    while time.perf_counter() - t0 < wait_s:
        with contextlib.suppress(aiohttp.ClientError):
            url = f"{system.base_url}/chat/completions"
            async with http.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    return round(time.perf_counter() - t0, 1)
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{system.name} did not answer within {wait_s:.0f} s")


async def phase(
    http: aiohttp.ClientSession,
    system: System,
    stream: bool,
    rate: float,
    seconds: float,
    plan: Plan,
) -> dict[str, Any]:
    """One rate for one system and mode, with its CPU per request."""
    cpu0 = cpu_by_process(system)
    own0 = time.process_time()
    samples, late_ms = await open_loop(
        http, system, request_body(MODEL, stream, MAX_TOKENS), stream, rate, seconds,
        plan.timeout_s,
    )  # fmt: skip
    row = summarize(samples, stream) | {"rate": rate, "generator_late_ms": round(late_ms, 1)}
    row["generator_cpu_ms_per_request"] = round((time.process_time() - own0) * 1000 / len(samples), 3)  # fmt: skip
    if cpu0:
        per = {role: (s - cpu0[role]) * 1000 / len(samples) for role, s in cpu_by_process(system).items()}  # fmt: skip
        row["cpu_ms_per_request"] = round(sum(per.values()), 3)  # all the system's processes
        row["cpu_ms_per_request_by_process"] = {role: round(v, 3) for role, v in per.items()}
    await settle(system, plan.settle_max_s)
    return row


async def settle(system: System, max_s: float) -> None:
    """Wait until the system is idle (its processes together under 10 % of a
    core): requests the
    client gave up on may still be running inside it and would be charged to
    the next phase."""
    t0 = time.perf_counter()
    await asyncio.sleep(0.3)
    while system.processes() and time.perf_counter() - t0 < max_s:
        cpu0 = sum(cpu_by_process(system).values())
        await asyncio.sleep(0.25)
        if sum(cpu_by_process(system).values()) - cpu0 < 0.025:
            return


async def measure_system(http: aiohttp.ClientSession, system: System, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"base_url": system.base_url, "phases": {}, "max_sustained_per_s": {}}
    out["ready_after_s"] = await ready(http, system)
    await open_loop(http, system, request_body(MODEL, True, 8), True, 50, plan.warmup_s, plan.timeout_s)  # fmt: skip
    for stream in (False, True):
        mode = "stream" if stream else "plain"
        steps, best = [], None
        for rate in plan.ladder:
            row = await phase(http, system, stream, rate, plan.ramp_seconds, plan)
            steps.append(row)
            print(f"  {system.name:<15}{mode:<7}{rate:>6g}/s  ramp {_line(row)}", flush=True)
            if row["success"] < 0.99:
                break
            best = rate
        out["max_sustained_per_s"][mode] = best
        out[f"ramp_{mode}"] = steps
        # After the ramp, which stops at the first overload, not before it.
        for rate in plan.rates:
            row = await phase(http, system, stream, rate, plan.seconds, plan)
            out["phases"][f"{mode}@{rate:g}"] = row
            print(f"  {system.name:<15}{mode:<7}{rate:>6g}/s  {_line(row)}", flush=True)
    if system.processes():
        out["cpu_counts"] = sorted(system.processes())
        out["external_peers"] = sorted(set().union(*map(remote_peers, system.processes().values())))  # fmt: skip
    return out


def _line(row: dict[str, Any]) -> str:
    ttft = (
        f" ttft p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']}" if "ttft_p50_ms" in row else ""
    )
    cpu = f" cpu {row['cpu_ms_per_request']} ms/req" if "cpu_ms_per_request" in row else ""
    total = f" total p50/p99 {row.get('total_p50_ms')}/{row.get('total_p99_ms')}"
    return f"ok {row['success']:.2%}{total}{ttft}{cpu}"


async def measure(systems: list[System], plan: Plan) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=1000)  # a backlog waits here, on its clock
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        if not plan.overlap_startup:
            for system in systems:
                await ready(http, system)
        results = {s.name: await measure_system(http, s, plan) for s in systems}
    ceiling = results.get("direct")
    if ceiling:
        for row in results.values():
            row["added"] = {
                key: added(phase_row, ceiling["phases"][key])
                for key, phase_row in row["phases"].items()
            }
    return results


def run(plan: Plan, factories: list[SystemFactory], fleet: tuple[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Start the fleet (unless ``fleet`` = (URL, key) of a running one) and the
    systems, measure them in order, stop them."""
    with contextlib.ExitStack() as stack:
        fleet_pid = None
        if fleet is None:
            urls, fleet_pid = stack.enter_context(fleet_with_pid(SCENARIO))
            fleet = (urls["paced"], "sk-fleet-stream-peers")
        systems = [stack.enter_context(f(*fleet)) for f in factories]
        fleet_cpu0 = tree_cpu_seconds(fleet_pid) if fleet_pid else 0.0
        results = asyncio.run(measure(systems, plan))
        fleet_cpu = tree_cpu_seconds(fleet_pid) - fleet_cpu0 if fleet_pid else None
    out = {
        "scenario": SCENARIO.relative_to(REPO).as_posix(),
        "plan": asdict(plan),
        "litellm_version": _version("litellm"),
        "fleet_cpu_s": fleet_cpu,
        "systems": results,
    }
    if gateway_system.NAME in results:
        out["llmq_settings"] = gateway_system.SETTINGS
        out["versus"] = {
            f"{gateway_system.NAME} vs {peer}": versus(out, gateway_system.NAME, peer)
            for peer in results
            if peer.startswith("litellm")
        }
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def extra_system(spec: str) -> SystemFactory:
    """``name=NAME,url=URL[,pid=PID][,key_env=VAR]`` -> a factory for a running system."""
    fields = dict(part.split("=", 1) for part in spec.split(","))
    key = os.environ.get(fields["key_env"], "") if "key_env" in fields else "none"
    system = System(fields["name"], fields["url"], key, int(fields["pid"]) if "pid" in fields else None)  # fmt: skip

    @contextlib.contextmanager
    def running(_url: str, _key: str) -> Iterator[System]:
        yield system

    return running


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a < 60 s smoke run")
    parser.add_argument("--rates", type=float, nargs="+", help="requests/s (100 500)")
    parser.add_argument("--seconds", type=float, help="per rate and mode (10)")
    parser.add_argument("--ladder", type=float, nargs="+", help="ramp steps, requests/s")
    parser.add_argument("--ramp-seconds", type=float, help="per ramp step (5)")
    parser.add_argument("--timeout", type=float, help="per request, s (10)")
    parser.add_argument("--system", action="append", default=[], metavar="SPEC",
                        help="name=NAME,url=BASE_URL[,pid=PID][,key_env=VAR]; repeatable")  # fmt: skip
    parser.add_argument(
        "--fleet-url", help="use a running fleet (base URL) instead of starting one"
    )
    parser.add_argument("--fleet-key-env", default="", help="variable holding that fleet's key")
    parser.add_argument("--no-llmq", action="store_true", help="leave out llmq's gateway")
    parser.add_argument("--litellm", choices=("default", "tuned", "both", "none"), default="default",
                        help="which LiteLLM Proxy configuration(s) to run (default: as shipped)")  # fmt: skip
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.quick:
        quick_results()
    changes = {
        "rates": tuple(args.rates) if args.rates else None,
        "seconds": args.seconds,
        "ladder": tuple(args.ladder) if args.ladder else None,
        "ramp_seconds": args.ramp_seconds,
        "timeout_s": args.timeout,
    }
    plan = Plan(**(asdict(plan) | {k: v for k, v in changes.items() if v is not None}))
    factories: list[SystemFactory] = [direct]
    if args.litellm != "none" and _version("litellm") is None:
        print("litellm is not installed here: run in .venv-bench (scripts/install bench)")
    elif args.litellm != "none":
        variants = {"default": [False], "tuned": [True], "both": [False, True]}[args.litellm]
        factories += [litellm_proxy(tuned) for tuned in variants]
    if not args.no_llmq:
        # After LiteLLM: with --quick, llmq is measured once LiteLLM's start-up
        # (tens of seconds of imports on one of the two cores) is over.
        factories.append(gateway_system.llmq_gateway)
    factories += [extra_system(s) for s in args.system]
    fleet = (args.fleet_url, os.environ.get(args.fleet_key_env, "")) if args.fleet_url else None
    result = run(plan, factories, fleet)
    print_table(result)
    print("saved", save("stream_peers", result))


if __name__ == "__main__":
    main()
