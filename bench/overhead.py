"""llmq's overhead over the ceiling, measured side by side in one invocation.

The ceiling systems of ``bench.ceiling`` (``echo``, ``http-echo``) and real
``llmq worker`` processes (1 and 2, ``concurrency = 256``, the default) each
get their own vhost with llmq's topology; all of them stay up, idle, and are
driven one at a time by the same load generator (:class:`bench.harness.Producer`)
on one zero-latency fake endpoint, alternating the order between rounds so
drift on a shared machine hits all of them:

* max jobs/s: closed loop, 1,024 jobs outstanding (median of the rounds);
* latency at 25/50/75% of the http-echo's max rate (open loop, evenly spaced,
  measured from each job's scheduled time), pooled over the rounds;
* CPU seconds per 1,000 jobs of the worker processes (/proc), their RSS.

Targets (issue 5): one llmq worker sustains >= 70% of the ceiling's jobs/s;
at 50% of the ceiling's rate llmq adds <= 2 ms p50 and <= 10 ms p99. The
http-echo is the fair ceiling (llmq makes the same HTTP call); the plain
echo is reported too. Writes bench/results/overhead.json, ceiling.json and
overhead_cdf.png.

    python -m bench.overhead [--quick] [--rounds N]
    python -m bench.overhead --profile [--seconds 10]   # where the worker's CPU goes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pstats
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench.ceiling import (
    Options,
    System,
    ceiling_part,
    ceiling_systems,
    print_table,
    run_comparison,
    strip_raw,
)
from bench.harness import (
    MODEL,
    REPO,
    SCENARIOS,
    WORK_QUEUE,
    Producer,
    declare_llmq_topology,
    ephemeral_scenario,
    fleet_process,
    llmq_config,
    private_vhost,
    quick_results,
    result_path,
    save,
    start_inprocess_worker,
    start_worker,
    stop_process,
    wait_for_consumers,
)

LLMQ_CONCURRENCY = 256
TARGET_RATIO = 0.70
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 10.0


def llmq_system(workers: int) -> System:
    def start(url: str, urls: dict[str, str], tmp: Path) -> list[subprocess.Popen[Any]]:
        config = llmq_config(
            tmp / f"llmq-{workers}w.toml", url, urls, [MODEL], concurrency=LLMQ_CONCURRENCY
        )
        return [start_worker(config, f"bench-{workers}w-{i}") for i in range(workers)]

    return System(
        f"llmq-{workers}w",
        "llmq",
        workers,
        start,
        f"{workers} `llmq worker` process(es), concurrency {LLMQ_CONCURRENCY}",
    )


def compare(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios and added latency of each llmq system over each ceiling system."""
    systems = result["systems"]
    out: dict[str, Any] = {}
    for name, s in systems.items():
        if s["kind"] != "llmq":
            continue
        out[name] = {}
        for ref_name, ref in systems.items():
            if ref["kind"] != "ceiling":
                continue
            row: dict[str, Any] = {
                "throughput_ratio": round(s["max_jobs_per_s"] / ref["max_jobs_per_s"], 3),
                "cpu_ratio": round(
                    s["worker_cpu_s_per_1000_jobs"] / max(ref["worker_cpu_s_per_1000_jobs"], 1e-9),
                    2,
                ),
            }
            for f, point in s["open_loop"].items():
                mine, theirs = point["latency"], ref["open_loop"][f]["latency"]
                if mine.get("count") and theirs.get("count"):
                    row[f"added_at_{f}"] = {
                        k: round(mine[k] - theirs[k], 3) for k in ("p50_ms", "p90_ms", "p99_ms")
                    }
            out[name][ref_name] = row
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for one llmq worker, against the http-echo (and the echo)."""
    rows: list[dict[str, Any]] = []
    cmp = result.get("comparison", {}).get("llmq-1w", {})
    for ref in ("http-echo", "echo"):
        c = cmp.get(ref)
        if not c:
            continue
        fair = " (fair)" if ref == "http-echo" else ""
        ratio = c["throughput_ratio"]
        rows.append(
            {
                "target": f"1 worker jobs/s >= 70% of {ref}{fair}",
                "value": f"{ratio:.0%}",
                "met": ratio >= TARGET_RATIO,
                "by": f"{(ratio - TARGET_RATIO) * 100:+.0f} points",
            }
        )
        added = c.get("added_at_0.5")
        if added:
            for key, limit in (("p50_ms", TARGET_ADDED_P50_MS), ("p99_ms", TARGET_ADDED_P99_MS)):
                v = added[key]
                rows.append(
                    {
                        "target": f"added {key[:3]} at 50% <= {limit:g} ms over {ref}{fair}",
                        "value": f"{v:+.2f} ms",
                        "met": v <= limit,
                        "by": f"{limit - v:+.2f} ms margin"
                        if v <= limit
                        else f"{v - limit:.2f} ms over",
                    }
                )
    return rows


def print_comparison(result: dict[str, Any]) -> None:
    print()
    width = 2 + max((len(n) for refs in result["comparison"].values() for n in refs), default=9)
    print(
        f"{'llmq':<{width}}{'vs':<{width}}{'jobs/s ratio':>13}{'CPU ratio':>11}  added p50 / p99 ms"
    )
    for name, refs in result["comparison"].items():
        for ref, c in refs.items():
            added = "  ".join(
                f"{k.removeprefix('added_at_')}: {v['p50_ms']:+.2f} / {v['p99_ms']:+.2f}"
                for k, v in c.items()
                if k.startswith("added_at_")
            )
            print(
                f"{name:<{width}}{ref:<{width}}{c['throughput_ratio']:>13.0%}"
                f"{c['cpu_ratio']:>11.2f}  {added}"
            )
    print()
    print("where llmq's time goes (its replies' routing timings; p50 / p99 ms, first round):")
    print("queue = publish to worker start, worker = in the worker minus the upstream call,")
    print("reply path = reply built to reply received (publish, broker, delivery)")
    for name, s in result["systems"].items():
        for f, point in s["open_loop"].items():
            b = (point.get("breakdown_per_round") or [None])[0]
            if b:
                print(
                    f"  {name:<8} at {float(f):.0%}: queue {b['queue_ms']['p50']} / {b['queue_ms']['p99']}"
                    f"   worker {b['worker_ms']['p50']} / {b['worker_ms']['p99']}"
                    f"   upstream {b['upstream_ms']['p50']} / {b['upstream_ms']['p99']}"
                    f"   reply path {b['reply_path_ms']['p50']} / {b['reply_path_ms']['p99']}"
                )
    print()
    for t in result["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} ({t['by']})")


def plot(result: dict[str, Any]) -> None:
    try:
        from bench.plots import latency_cdfs
    except ImportError as exc:  # matplotlib lives in .venv-bench only
        print(f"no plot ({exc})")
        return
    path = latency_cdfs(
        result["_latencies"],
        result_path("overhead_cdf", "png"),
        rates=result["rates_per_s"],
        title="Round-trip latency, ceiling vs llmq (zero-latency endpoint)",
    )
    print("plot", path)


# ---------------------------------------------------------------------------
# Profiling: one worker in-process under the closed-loop load.


def profile(seconds: float, window: int, keep: Path | None = None) -> dict[str, Any]:
    """pyinstrument (time by library) then cProfile (calls per job), same load."""
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    out: dict[str, Any] = {"window": window, "seconds": seconds}
    with tempfile.TemporaryDirectory() as tmp:
        scenario = ephemeral_scenario(SCENARIOS / "zero.toml", Path(tmp))
        with fleet_process(scenario) as urls:
            for tool in ("none", "pyinstrument", "cprofile"):
                with private_vhost() as url:
                    uvloop.run(declare_llmq_topology(url))
                    config = llmq_config(
                        Path(tmp) / "llmq.toml", url, urls, [MODEL], concurrency=LLMQ_CONCURRENCY
                    )
                    suffix = {"pyinstrument": ".json", "cprofile": ".pstats"}.get(tool, "")
                    prof_out = Path(tmp) / f"profile{suffix}"
                    stats_out = Path(tmp) / "stats.json"
                    proc = start_inprocess_worker(
                        config,
                        "bench-profile",
                        stats_out,
                        profile=None if tool == "none" else tool,
                        profile_out=prof_out,
                    )
                    try:
                        run = uvloop.run(_profile_load(url, proc, seconds, window))
                    finally:
                        stop_process(proc)
                    stats = json.loads(stats_out.read_text())
                    marks = stats["marks"]
                    jobs = marks["ok_stop"] - marks["ok_start"]
                    entry = {
                        "jobs": jobs,
                        "jobs_per_s": round(jobs / (marks["stop"] - marks["start"]), 1),
                        "worker_cpu_ms_per_job": round(
                            (marks["cpu_stop"] - marks["cpu_start"]) * 1000 / max(jobs, 1), 3
                        ),
                        "producer_jobs_per_s": run["jobs_per_s"],
                    }
                    if tool == "pyinstrument":
                        data = json.loads(prof_out.read_text())
                        total = data["sampled_s"] or 1.0
                        entry["self_share_by_package"] = {
                            k: round(v / total, 3) for k, v in data["self_s_by_package"].items()
                        }
                        entry["top_functions_self_share"] = {
                            k: round(v / total, 3)
                            for k, v in list(data["self_s_top_functions"].items())[:25]
                        }
                        entry["top_functions_inclusive_share"] = {
                            k: round(v / total, 3)
                            for k, v in list(data["inclusive_s_top_functions"].items())[:60]
                        }
                        # Relative paths: results are committed, machine paths are not.
                        text = prof_out.with_suffix(".txt").read_text().replace(f"{REPO}/", "")
                        result_path("overhead_profile", "txt").write_text(text)
                    elif tool == "cprofile":
                        entry.update(_cprofile_summary(prof_out, jobs))
                    if keep is not None and tool != "none":
                        keep.mkdir(parents=True, exist_ok=True)
                        for f in Path(tmp).glob("profile*"):
                            shutil.copy2(f, keep / f.name)
                    out[tool] = entry
                    print(
                        f"{tool}: {entry['jobs_per_s']} jobs/s, {entry['worker_cpu_ms_per_job']} ms CPU/job"
                    )
    return out


async def _profile_load(
    url: str, proc: subprocess.Popen[str], seconds: float, window: int
) -> dict[str, Any]:
    await wait_for_consumers(url, WORK_QUEUE, 1)
    async with Producer(url) as producer:
        res = await producer.closed_loop(
            window,
            warmup_s=2.0,
            measure_s=seconds,
            on_start=lambda: os.kill(proc.pid, signal.SIGUSR1),
            on_stop=lambda: os.kill(proc.pid, signal.SIGUSR2),
        )
    res.pop("latencies_ms")
    await asyncio.sleep(0.5)
    return res


def _cprofile_summary(path: Path, jobs: int) -> dict[str, Any]:
    """Calls per job of the functions that matter, and tottime by library."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    from bench.harness import _package

    by_package: dict[str, float] = {}
    per_job: dict[str, float] = {}
    total = 0.0
    for (file, _line, func), (_cc, ncalls, tottime, _ct, _callers) in raw.items():
        pkg = _package(file) if file != "~" else "(builtin)"
        by_package[pkg] = by_package.get(pkg, 0.0) + tottime
        total += tottime
        key = f"{pkg}:{func}"
        per_job[key] = per_job.get(key, 0.0) + ncalls / max(jobs, 1)
    watch = [
        k
        for k in per_job
        if k.endswith(
            (
                ":__setattr__",
                ":create_task",
                ":basic_publish",
                ":marshall",
                ":_process",
                ":decode_job",
                ":model_validate",
                ":__init__",
            )
        )
        and per_job[k] >= 0.5
    ]
    top_calls = sorted(per_job.items(), key=lambda kv: -kv[1])[:25]
    # By layer, with built-ins (len, isinstance, socket writes, ...) charged to their callers.
    layer_of = {
        "aio_pika": "AMQP client (aio-pika, aiormq, pamqp, asyncio streams/queues)",
        "aiormq": "AMQP client (aio-pika, aiormq, pamqp, asyncio streams/queues)",
        "pamqp": "AMQP client (aio-pika, aiormq, pamqp, asyncio streams/queues)",
        "stdlib:streams": "AMQP client (aio-pika, aiormq, pamqp, asyncio streams/queues)",
        "stdlib:queues": "AMQP client (aio-pika, aiormq, pamqp, asyncio streams/queues)",
        "aiohttp": "HTTP client (aiohttp, yarl, multidict)",
        "yarl": "HTTP client (aiohttp, yarl, multidict)",
        "multidict": "HTTP client (aiohttp, yarl, multidict)",
        "workers": "llmq (workers, schemas, pydantic)",
        "schemas": "llmq (workers, schemas, pydantic)",
        "pydantic": "llmq (workers, schemas, pydantic)",
        "prometheus_client": "metrics (prometheus_client)",
    }
    layers: dict[str, float] = {}
    for (file, _line, _func), (_cc, _nc, tottime, _ct, callers) in raw.items():
        if file == "~":
            calls = sum(c[1] for c in callers.values()) or 1
            shares = [(_package(cf), c[1] / calls) for (cf, _l, _f), c in callers.items()]
        else:
            shares = [(_package(file), 1.0)]
        for pkg, share in shares:
            layer = layer_of.get(
                pkg, "asyncio and other stdlib" if pkg.startswith("stdlib") else pkg
            )
            layers[layer] = layers.get(layer, 0.0) + tottime * share
    own = sorted(
        (
            (tottime, f"{Path(file).parent.name}/{Path(file).name}:{func}", ncalls)
            for (file, _l, func), (_cc, ncalls, tottime, _ct, _callers) in raw.items()
            if _package(file) in ("workers", "schemas")
        ),
        reverse=True,
    )[:15]
    return {
        "tottime_share_by_layer": {
            k: round(v / total, 3)
            for k, v in sorted(layers.items(), key=lambda kv: -kv[1])
            if v / total >= 0.002
        },
        "llmq_top_self": {name: round(t / total, 4) for t, name, _n in own},
        "tottime_share_by_package": {
            k: round(v / total, 3) for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])
        },
        "python_calls_per_job": round(sum(n for _, (_, n, *_r) in raw.items()) / max(jobs, 1), 1),
        "calls_per_job_top": {k: round(v, 1) for k, v in top_calls},
        "calls_per_job_watch": {k: round(per_job[k], 1) for k in sorted(watch)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--profile", action="store_true", help="profile one worker instead")
    parser.add_argument("--seconds", type=float, default=10.0, help="profiled window (--profile)")
    parser.add_argument("--keep", type=Path, help="copy the raw profiles here (--profile)")
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
    if args.profile:
        result = profile(args.seconds, 1024, args.keep)
        print("saved", save("overhead_profile", result))
        return
    options = Options.quick() if args.quick else Options()
    if args.rounds:
        options.rounds = args.rounds
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    systems = [*ceiling_systems(), llmq_system(1), llmq_system(2)]
    result = run_comparison(systems, options)
    result["comparison"] = compare(result)
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_before"] = load_before
    print_table(result)
    print_comparison(result)
    plot(result)
    print("saved", save("ceiling", ceiling_part(result)))
    print("saved", save("overhead", strip_raw(result)))


if __name__ == "__main__":
    main()
