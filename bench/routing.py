"""Routing quality: llmq against the routers users would pick instead, on a misbehaving fleet.

For each scenario in ``bench/scenarios/routing_*.toml`` and each router, a
fresh fleet process serves the scenario (same fleet seed every time), and the
same seeded open-loop Poisson job stream (each job with a deadline and a
max_tokens) is sent through the router. Routers: ``llmq`` (a real ``llmq
worker`` process, jobs published to the broker with ``LlmqClient``) and
in-process baselines calling the fleet directly — random, round robin,
"sort by weighted average latency and take the minimum", LiteLLM Router with
``latency-based-routing`` and ``simple-shuffle``. The baselines have no broker
in their path, which favours them. Method and fairness notes:
docs/benchmarks-routing.md.

    python -m bench.routing [--quick] [--scenario NAME ...] [--router NAME ...]

Writes bench/results/routing.json (routing_quick.json with --quick) and PNG
plots next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import uvloop

from bench.harness import RESULTS, fleet_process, private_vhost, save, start_worker
from bench.routing_report import bound_summary, plot, summarize, table, targets
from bench.routing_routers import (
    LITELLM,
    LLMQ,
    MODEL,
    ROUTERS,
    LlmqRouter,
    Outcome,
    Serving,
    make_router,
    warm_litellm,
)
from bench.routing_stream import (
    FULL_S,
    LEAD_S,
    Job,
    healthy_reference,
    job_stream,
    lower_bound,
    prepare_scenario,
    windows_in_stream,
)

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
SCENARIOS = ("steady", "spike", "outage", "errors", "capacity")
QUICK_S = 3.0
QUICK_ROUTERS = (LLMQ, "round_robin", "latency_min", "litellm_latency")
"""--quick leaves out random and simple-shuffle (same code paths as round robin and
LiteLLM latency) to stay near two minutes; --router adds them back."""
KEY_ENV = "ROUTING_BENCH_FLEET_KEY"  # the worker reads the fake fleet key from here
QUEUE = "llmq.q.interactive"
log = logging.getLogger("bench.routing")


@dataclass(frozen=True)
class Config:
    duration_s: float
    rate: float
    sla_s: float
    grace_s: float
    seed: int
    fleet_seed: int
    quick: bool
    dump: Path | None = None


# --- llmq's worker -------------------------------------------------------------------


def write_worker_config(path: Path, amqp_url: str, urls: dict[str, str]) -> Path:
    """A worker config as a user would write it: endpoints, key from the environment,
    everything else (max_concurrency, retries, hedging for interactive) at its default."""
    lines = ["[broker]", f'url = "{amqp_url}"']
    for name, url in urls.items():
        lines += [
            "[[endpoints]]",
            f'name = "{name}"',
            f'base_url = "{url}"',
            f'api_key_env = "{KEY_ENV}"',
            f'models = ["{MODEL}"]',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _wait_consumer(amqp_url: str, timeout_s: float = 30.0) -> None:
    from schemas.broker.topology import apply_topology
    from schemas.settings import TopologySettings
    from schemas.topology import plan

    connection = await aio_pika.connect(amqp_url)
    try:
        await apply_topology(connection, plan(TopologySettings()))
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            channel = await connection.channel()
            queue = await channel.declare_queue(QUEUE, passive=True)
            consumers = queue.declaration_result.consumer_count
            await channel.close()
            if consumers:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the llmq worker did not start consuming in time")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def llmq_worker(amqp_url: str, urls: dict[str, str], tmp: Path) -> AsyncIterator[None]:
    config = write_worker_config(tmp / "llmq-routing.toml", amqp_url, urls)
    os.environ[KEY_ENV] = "sk-fleet-routing"
    worker = start_worker(config, "routing-bench")
    try:
        await _wait_consumer(amqp_url)
        yield
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except Exception:
            worker.kill()
            worker.wait(timeout=10)


# --- one run ------------------------------------------------------------------------------


async def _fleet_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    base = url.removesuffix("/v1")
    async with session.get(f"{base}/fleet/stats") as response:
        data: dict[str, Any] = await response.json()
        return data


async def drive(
    jobs: list[Job], router: Serving, start: float, cfg: Config
) -> tuple[list[tuple[float, Outcome]], list[float]]:
    """Send the stream open-loop; each job bounded by its deadline + grace."""
    lag: list[float] = []

    async def one(job: Job, t0: float) -> tuple[float, Outcome]:
        deadline = t0 + cfg.sla_s
        try:
            outcome = await asyncio.wait_for(
                router.serve(job, deadline), timeout=deadline + cfg.grace_s - time.monotonic()
            )
        except TimeoutError:
            outcome = Outcome(False, error="no answer by deadline + grace")
        return time.monotonic() - t0, outcome

    tasks = []
    for job in jobs:
        t0 = start + job.at
        delay = t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(max(0.0, time.monotonic() - t0))
        tasks.append(asyncio.create_task(one(job, t0)))
    return list(await asyncio.gather(*tasks)), lag


async def run_one(
    scenario_name: str,
    router_name: str,
    jobs: list[Job],
    cfg: Config,
    amqp_url: str | None,
    tmp: Path,
) -> dict[str, Any]:
    load = round(os.getloadavg()[0], 2)
    path = tmp / f"routing_{scenario_name}.toml"
    scenario = prepare_scenario(
        SCENARIO_DIR / f"routing_{scenario_name}.toml", path, cfg.duration_s
    )
    urls = {e.name: f"http://127.0.0.1:{e.port}/v1" for e in scenario.endpoints}
    # Fleet stats are read from an endpoint that never goes down.
    stats_from = next(e.name for e in scenario.endpoints if not any(w.down for w in e.windows))
    async with contextlib.AsyncExitStack() as stack:
        client = None
        if router_name == LLMQ:
            assert amqp_url is not None
            await stack.enter_async_context(llmq_worker(amqp_url, urls, tmp))
            from producers.client import LlmqClient

            client = await stack.enter_async_context(LlmqClient(amqp_url))
        served = stack.enter_context(fleet_process(path, seed=cfg.fleet_seed))
        assert served == urls, (served, urls)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        router: Serving
        if client is not None:
            router = LlmqRouter(client, int(cfg.sla_s * 1000), cfg.grace_s)
        else:
            router = make_router(router_name, urls, cfg.seed, cfg.sla_s)
        stats = await _fleet_json(session, urls[stats_from])
        start = time.monotonic() - stats["uptime_s"] + LEAD_S
        if time.monotonic() > start:
            log.warning("%s/%s: set-up ran past the stream start", scenario_name, router_name)
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        results, lag = await drive(jobs, router, start, cfg)
        await router.aclose()
        await asyncio.sleep(0.2)  # let cancelled attempts reach the fleet's counters
        fleet = await _fleet_json(session, urls[stats_from])
    if cfg.dump is not None:
        cfg.dump.mkdir(parents=True, exist_ok=True)
        raw = [
            {
                "job": j.index,
                "at": round(j.at, 4),
                "max_tokens": j.max_tokens,
                "latency_s": round(lat, 4),
                **asdict(out),
            }
            for j, (lat, out) in zip(jobs, results, strict=True)
        ]
        (cfg.dump / f"{scenario_name}.{router_name}.json").write_text(json.dumps(raw))
    summary = summarize(
        jobs,
        results,
        fleet,
        sla_s=cfg.sla_s,
        duration_s=cfg.duration_s,
        endpoints=list(urls),
        lag_s=lag,
    )
    summary["loadavg_1m_before"] = load
    return summary


# --- the whole benchmark --------------------------------------------------------------


async def run_all(cfg: Config, scenarios: list[str], routers: list[str]) -> dict[str, Any]:
    jobs = job_stream(cfg.seed, cfg.rate, cfg.duration_s)
    data: dict[str, Any] = {
        "config": {
            **asdict(cfg),
            "dump": None,
            "jobs": len(jobs),
            "lead_s": LEAD_S,
            "routers": routers,
        },
        "scenarios": {},
    }
    with contextlib.suppress(metadata.PackageNotFoundError):
        data["config"]["litellm"] = metadata.version("litellm")
    if any(r in LITELLM for r in routers):
        await warm_litellm()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        amqp_url = stack.enter_context(private_vhost()) if LLMQ in routers else None
        for name in scenarios:
            scenario = prepare_scenario(
                SCENARIO_DIR / f"routing_{name}.toml", tmp / "bound.toml", cfg.duration_s
            )
            bound = lower_bound(scenario, jobs, cfg.seed)
            ref = healthy_reference(scenario)
            entry: dict[str, Any] = {
                "endpoints": [e.name for e in scenario.endpoints],
                "windows": windows_in_stream(scenario, cfg.duration_s),
                "lower_bound": bound_summary(bound["best"]),
                "reference": (
                    {"endpoint": ref.name, **bound_summary(bound["reference"])} if ref else None
                ),
                "routers": {},
            }
            data["scenarios"][name] = entry
            for router in routers:
                t = time.monotonic()
                try:
                    entry["routers"][router] = await run_one(name, router, jobs, cfg, amqp_url, tmp)
                except RuntimeError as exc:  # e.g. a free port taken before the fleet bound it
                    log.warning("%s/%s: %s; running it again", name, router, exc)
                    entry["routers"][router] = await run_one(name, router, jobs, cfg, amqp_url, tmp)
                r = entry["routers"][router]
                print(
                    f"  {name:<9} {router:<16} ok {r['success_pct']:5.1f}%  met"
                    f" {r['deadline_met_pct']:5.1f}%  p99 {r['p99_ms']} ms  calls/job"
                    f" {r['upstream_calls_per_job']}  ({time.monotonic() - t:.1f} s)",
                    flush=True,
                )
            entry["targets"] = targets(entry)
            print(table(name, entry), flush=True)
    data["config"]["wall_s"] = round(time.monotonic() - began, 1)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short streams (a smoke test)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--router", action="append", choices=ROUTERS)
    parser.add_argument("--duration", type=float, help="stream length, s")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs/s (Poisson)")
    parser.add_argument("--sla", type=float, default=3.0, help="deadline per job, s")
    parser.add_argument("--seed", type=int, default=1, help="job stream seed")
    parser.add_argument("--fleet-seed", type=int, default=11)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--dump", type=Path, help="also write each run's per-job records here")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the PNGs from the saved JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Closing the reply queue at the end of a run cancels the client's consumer: not news.
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    name = "routing_quick" if args.quick else "routing"
    if args.replot:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        print("drew", *(str(p) for p in plot(saved, RESULTS, name)))
        return
    duration = args.duration or (QUICK_S if args.quick else FULL_S)
    cfg = Config(
        duration, args.rate, args.sla, 1.0, args.seed, args.fleet_seed, args.quick, args.dump
    )
    routers = args.router or list(QUICK_ROUTERS if args.quick else ROUTERS)
    data = uvloop.run(run_all(cfg, args.scenario or list(SCENARIOS), routers))
    if not args.no_plots:
        data["plots"] = [p.name for p in plot(data, RESULTS, name)]
    print("saved", save(name, data))
    print(
        json.dumps({k: v.get("targets", {}).get("all_met") for k, v in data["scenarios"].items()})
    )


if __name__ == "__main__":
    main()
