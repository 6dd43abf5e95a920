"""``python -m bench <name>|all|summary [--quick]``: run llmq's benchmarks.

Names: ceiling, overhead (ceiling and llmq side by side), concurrency, burst,
routing, gateway, pick, fleet, worker_throughput, priority, fleet_limits,
spend_cap, cluster, stream_peers, stream_latency. ``all`` runs overhead (which includes the ceiling, so the
ratios come from one invocation), concurrency, burst, routing, gateway, pick,
fleet, priority, fleet_limits, spend_cap, cluster, stream_peers and stream_latency, each in its own
process (a failure or a pinned CPU in one does not affect the next), then
prints the summary of headline figures against the issue's targets and
writes bench/results/summary.json. ``summary`` rebuilds that from the
results already on disk. ``--quick`` is a short smoke run of everything
(~2 minutes); its results go to ``*_quick`` files next to the real ones.

``make bench`` = ``python -m bench all`` in .venv-bench. The whole suite
takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import RESULTS, environment, result_path

# name -> (module, extra args for a full run, extra args for --quick)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "ceiling": ("bench.ceiling", [], ["--quick"]),
    "overhead": ("bench.overhead", [], ["--quick"]),
    "concurrency": ("bench.concurrency", [], ["--quick"]),
    "burst": ("bench.burst", [], ["--quick"]),
    "routing": ("bench.routing", [], ["--quick"]),
    "gateway": ("bench.gateway_overhead", [], ["--requests", "400", "--rounds", "2"]),
    "pick": ("bench.pick", [], ["--picks", "5000", "--runs", "3"]),
    "fleet": ("bench.fleet_ceiling", [], ["--requests", "5000", "--wrk-seconds", "2"]),
    "worker_throughput": ("bench.worker_throughput", [], ["--jobs", "3000"]),
    "priority": ("bench.priority", [], ["--quick"]),
    "fleet_limits": ("bench.fleet_limits", [], ["--quick"]),
    "spend_cap": ("bench.spend_cap", [], ["--quick"]),
    "cluster": ("bench.cluster", [], ["--quick"]),
    "stream_peers": ("bench.stream_peers", [], ["--quick"]),
    "stream_latency": ("bench.stream_latency", [], ["--quick"]),
}
ALL = [
    "overhead",
    "concurrency",
    "burst",
    "routing",
    "gateway",
    "pick",
    "fleet",
    "priority",
    "fleet_limits",
    "spend_cap",
    "cluster",
    "stream_peers",
    "stream_latency",
]
TIMEOUT_S = {
    "routing": 900,
    "burst": 600,
    "priority": 900,
    "fleet_limits": 600,
    "stream_peers": 1500,  # three systems, overloaded phases wait out their timeouts
}


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def run_one(name: str, quick: bool, extra: list[str]) -> None:
    """In this process: the benchmark's main() with its arguments."""
    module, full, smoke = BENCHMARKS[name]
    args = (smoke if quick else full) + extra
    if quick:
        os.environ["BENCH_RESULT_SUFFIX"] = "_quick"
        if name == "pick":
            args += ["--out", str(result_path("pick"))]
    main: Callable[..., Any] = importlib.import_module(module).main
    saved = sys.argv
    sys.argv = [f"python -m {module}", *args]
    try:
        if inspect.signature(main).parameters:
            main(args)
        else:  # a main() that reads sys.argv itself
            main()
    finally:
        sys.argv = saved


def run_all(quick: bool) -> dict[str, Any]:
    """Each benchmark in its own process; returns {name: status}."""
    status: dict[str, Any] = {}
    began = time.monotonic()
    for name in ALL:
        module = BENCHMARKS[name][0]
        if not available(module):
            print(f"\n=== {name}: skipped ({module} is not there yet)")
            status[name] = {"status": "skipped", "reason": f"{module} not importable"}
            continue
        print(f"\n=== {name} ({module}){' --quick' if quick else ''}", flush=True)
        cmd = [sys.executable, "-m", "bench", name, *(["--quick"] if quick else [])]
        t0 = time.monotonic()
        with _keep_committed("fleet_ceiling", quick and name == "fleet"):
            rc = _run_bounded(cmd, TIMEOUT_S.get(name, 480))
        seconds = round(time.monotonic() - t0, 1)
        status[name] = {"status": "ok" if rc == 0 else f"failed ({rc})", "seconds": seconds}
        print(f"=== {name}: {status[name]['status']} in {seconds:.0f} s", flush=True)
    status["_total_s"] = round(time.monotonic() - began, 1)
    return status


def _run_bounded(cmd: list[str], timeout_s: float) -> int | str:
    """Run a benchmark in its own process group; past ``timeout_s`` stop the whole
    group (its workers, fleet and echo processes too), SIGTERM first."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return "timeout"
    except KeyboardInterrupt:  # its own session: Ctrl-C does not reach it by itself
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
            return


@contextlib.contextmanager
def _keep_committed(name: str, active: bool) -> Any:
    """fleet_ceiling writes a fixed path: in --quick, move its output to *_quick
    and put the committed file back."""
    path = RESULTS / f"{name}.json"
    backup = RESULTS / f".{name}.json.bak"
    if active and path.exists():
        shutil.copy2(path, backup)
    try:
        yield
    finally:
        if active:
            if path.exists():
                shutil.move(path, RESULTS / f"{name}_quick.json")
            if backup.exists():
                shutil.move(backup, path)


# ---------------------------------------------------------------------------
# The summary: headline figures and the targets, from the result files.


def _load(name: str) -> dict[str, Any] | None:
    path = result_path(name)
    if not path.exists():
        return None
    with contextlib.suppress(ValueError):
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return None


def _row(
    bench: str,
    figure: str,
    value: str,
    target: str = "",
    met: bool | None = None,
    by: str = "",
) -> dict[str, Any]:
    return {
        "benchmark": bench,
        "figure": figure,
        "value": value,
        "target": target,
        "met": met,
        "by": by,
    }


def _ms(value: float | None) -> str:
    return "fail" if value is None else f"{value:.0f} ms"


def _routing_detail(key: str, t: dict[str, Any]) -> str:
    """One routing target's figures, short enough for a table cell."""
    if key == "calls_per_job_le_1_3":
        return f"llmq {t['llmq']:.3f}"
    if key == "best_deadline_met":
        return f"llmq {t['llmq_pct']:.1f}% vs {t['best_other']} {t['best_other_pct']:.1f}%"
    if key == "p99_within_1_5x_healthy":
        return (
            f"llmq {_ms(t['llmq_ms'])} vs limit {_ms(t['limit_ms'])}"
            f" (1.5 x {t['endpoint']} {_ms(t['endpoint_p99_ms'])})"
        )
    if "best_other_ms" in t:
        return f"llmq {_ms(t['llmq_ms'])} vs {t['best_other']} {_ms(t['best_other_ms'])}"
    return ", ".join(f"{a}={v}" for a, v in t.items() if a != "met")


def summary_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    o = _load("overhead")
    if o:
        s = o["systems"]
        for name in ("echo", "http-echo", "llmq-1w", "llmq-2w"):
            if name in s:
                rows.append(
                    _row(
                        "ceiling" if s[name]["kind"] == "ceiling" else "overhead",
                        f"{name} max jobs/s",
                        f"{s[name]['max_jobs_per_s']:.0f}",
                    )
                )
        for t in o.get("targets", []):
            if "(fair)" in t["target"]:
                rows.append(_row("overhead", t["target"], t["value"], "", t["met"], t["by"]))
            else:
                # Against the plain echo, which makes no HTTP call: for scale, not a target.
                figure = t["target"] + " (for scale)"
                rows.append(_row("overhead", figure, f"{t['value']} ({t['by']})"))
        c = o.get("comparison", {}).get("llmq-1w", {}).get("http-echo")
        if c:
            rows.append(
                _row(
                    "overhead",
                    "worker CPU s/1000 jobs, llmq-1w vs http-echo",
                    f"{s['llmq-1w']['worker_cpu_s_per_1000_jobs']:.3f} vs"
                    f" {s['http-echo']['worker_cpu_s_per_1000_jobs']:.3f} ({c['cpu_ratio']:.2f}x)",
                )
            )
            rows.append(
                _row(
                    "overhead",
                    "llmq-1w worker peak RSS",
                    f"{s['llmq-1w']['worker_peak_rss_mb'][0]:.0f} MB",
                )
            )
    elif (c := _load("ceiling")) is not None:
        for name, x in c["systems"].items():
            rows.append(_row("ceiling", f"{name} max jobs/s", f"{x['max_jobs_per_s']:.0f}"))
    k = _load("concurrency")
    if k:
        rows.append(
            _row(
                "concurrency",
                f"jobs/s, {k['in_flight_target']} in flight at {k['endpoint_latency_ms']} ms",
                f"{k['jobs_per_s']:.0f} ({k['throughput_of_ideal']:.0%} of {k['ideal_jobs_per_s']:.0f})",
            )
        )
        rss = k["worker_peak_rss_mb"]
        rows.append(
            _row(
                "concurrency",
                "worker peak RSS",
                f"{rss:.0f} MB",
                f"< {k['target_rss_mb']:.0f} MB",
                rss < k["target_rss_mb"],
                f"{k['target_rss_mb'] - rss:+.0f} MB",
            )
        )
        rows.append(_row("concurrency", "event-loop lag p99", f"{k['loop_lag_ms']['p99']} ms"))
        rows.append(
            _row(
                "concurrency",
                "added over the endpoint p50 / p99",
                f"{k['added_p50_ms']:+.0f} / {k['added_p99_ms']:+.0f} ms",
            )
        )
        e = k.get("echo_reference")
        if e:
            rows.append(
                _row(
                    "concurrency",
                    "http-echo at the same load (for scale)",
                    f"{e['jobs_per_s']:.0f} jobs/s, added p50 / p99 {e['added_p50_ms']:+.0f} / {e['added_p99_ms']:+.0f} ms",
                )
            )
    b = _load("burst")
    if b:
        rows.append(
            _row(
                "burst", f"publish {b['jobs']:,} with confirms", f"{b['publish_per_s']:,.0f} jobs/s"
            )
        )
        rows.append(
            _row(
                "burst",
                f"drain with {b['workers']} worker(s)",
                f"{b['drain_s']:.0f} s ({b['drain_per_s']:,.0f} jobs/s)",
            )
        )
        rows.append(_row("burst", "peak worker RSS", f"{max(b['worker_peak_rss_mb']):.0f} MB"))
        rows.append(_row("burst", "lost", str(b["lost"]), "0", b["lost"] == 0, ""))
    r = _load("routing")
    if r:
        for scenario, data in r.get("scenarios", {}).items():
            for key, t in (data.get("targets") or {}).items():
                if not isinstance(t, dict) or "met" not in t:
                    continue
                detail = _routing_detail(key, t)
                # "info_*" entries are context, not targets.
                met = None if key.startswith("info") else bool(t["met"])
                rows.append(_row("routing", f"{scenario}: {key}", detail, key, met))
    g = _load("gateway_overhead")
    if g:
        a = g["gateway_added"]
        rows.append(
            _row(
                "gateway",
                "added over LlmqClient p50 / p99",
                f"{a['p50_ms']:+.2f} / {a['p99_ms']:+.2f} ms",
            )
        )
    p = _load("pick")
    if p:
        pol = p.get("policies", {})
        if pol:
            first = next(iter(pol))
            rows.append(
                _row(
                    "pick",
                    f"{first} pick / full cycle",
                    f"{pol[first]['pick_us']:.1f} / {pol[first]['cycle_us']:.1f} µs",
                )
            )
    rows += _priority_rows()
    rows += _spend_cap_rows()
    rows += _cluster_rows()
    rows += _stream_latency_rows()
    rows += _stream_peers_rows()
    f = _load("fleet_ceiling")
    if f:
        srv = f.get("results", {}).get("server", {})
        best = (srv.get("wrk") or srv.get("python_client") or {}).get("rps")
        if best:
            rows.append(_row("fleet", "fake endpoint ceiling (one core)", f"{best:,.0f} req/s"))
    return rows


def _priority_rows() -> list[dict[str, Any]]:
    """Issue #13: interactive before a batch backlog; limits held by a changing fleet."""
    rows: list[dict[str, Any]] = []
    p = _load("priority")
    for r in (p or {}).get("runs", []):
        w = f"{r['workers']} worker(s), {r['backlog']:,} batch backlog"
        alone = r["interactive_alone_ms"].get("p99_ms")
        backed = r["interactive_with_backlog_ms"].get("p99_ms")
        rows.append(
            _row(
                "priority",
                f"interactive p99 with / without backlog, {w}",
                f"{_ms(backed)} / {_ms(alone)} (x{r['p99_ratio']})",
                "<= 1.25x",
                bool(r["pass_p99"]),
            )
        )
        rows.append(
            _row(
                "priority",
                f"batch drain beside interactive, {w}",
                f"{r['batch_with_interactive_per_s']:.0f}/s of {r['batch_alone_per_s']:.0f}/s"
                f" - {r['interactive_rate']:.0f}/s interactive ({r['drain_share_of_free']:.0%})",
                ">= 90% of the free capacity",
                bool(r["pass_drain"]),
            )
        )
    f = _load("fleet_limits")
    if f:
        rows.append(
            _row(
                "fleet_limits",
                f"peak in flight, {f['workers']}",
                str(f["peak_in_flight"]),
                f"<= {f['max_concurrency']}",
                bool(f["pass_concurrency"]),
            )
        )
        rows.append(
            _row(
                "fleet_limits",
                "most requests in any 60 s",
                str(f["max_requests_in_any_60s"]),
                f"<= {f['rpm']}",
                bool(f["pass_rpm"]),
            )
        )
    return rows


def _spend_cap_rows() -> list[dict[str, Any]]:
    """Issue #13: a hard cap holds across a restart of every worker."""
    c = _load("spend_cap")
    if not c:
        return []
    return [
        _row(
            "spend_cap",
            f"overshoot of a {c['cap_usd']:.2f} USD cap, all {c['workers']} workers restarted",
            f"{c['overshoot_usd']:+.4f} USD (largest job {c['largest_job_usd']:.4f})",
            "<= one job",
            bool(c["passed"]),
        )
    ]


def _cluster_rows() -> list[dict[str, Any]]:
    """Issue #14: one worker on a three-node 4.x cluster against one 4.x node."""
    c = _load("cluster")
    if not c:
        return []
    llmq = c["cluster_cost"]["llmq"]
    rows = [
        _row(
            "cluster",
            "1 worker jobs/s, 4.x node -> 3-node cluster",
            f"{llmq['max_jobs_per_s'][0]:.0f} -> {llmq['max_jobs_per_s'][1]:.0f}"
            f" (x{llmq['throughput_ratio']:.2f})",
        )
    ]
    for key, added in llmq.items():
        if key.startswith("added_at_"):
            rate = c["rates_per_s"][key.removeprefix("added_at_")]
            rows.append(
                _row(
                    "cluster",
                    f"cluster's added p50 / p99 at {rate:.0f}/s",
                    f"{added['p50_ms']:+.2f} / {added['p99_ms']:+.2f} ms",
                )
            )
    return rows


def _stream_latency_rows() -> list[dict[str, Any]]:
    """Issue #15: time to first token and per-token delay added by llmq's paths."""
    s = _load("stream_latency")
    if not s:
        return []
    paths, rate = s["paths"], s["rate_per_s"]
    client = paths["client"]
    rows = []
    for name, p50_target, p99_target in (("client", 3.0, 10.0), ("gateway", None, None)):
        p = paths[name]
        if p50_target is not None and p99_target is not None:
            rows.append(
                _row(
                    "stream",
                    f"TTFT added via {name} at {rate:g}/s, p50 <= 3 ms",
                    f"{p['added_ttft_p50_ms']:+.2f} ms",
                    "<= 3 ms",
                    p["added_ttft_p50_ms"] <= p50_target,
                )
            )
            rows.append(
                _row(
                    "stream",
                    f"TTFT added via {name} at {rate:g}/s, p99 <= 10 ms",
                    f"{p['added_ttft_p99_ms']:+.2f} ms",
                    "<= 10 ms",
                    p["added_ttft_p99_ms"] <= p99_target,
                )
            )
        else:
            rows.append(
                _row(
                    "stream",
                    f"TTFT added via {name} at {rate:g}/s, p50 / p99",
                    f"{p['added_ttft_p50_ms']:+.2f} / {p['added_ttft_p99_ms']:+.2f} ms",
                )
            )
    hop = paths["hop"]
    rows.append(
        _row(
            "stream",
            "the durable hop alone (floor), p50 / p99",
            f"{hop['ttft_p50_ms']:.2f} / {hop['ttft_p99_ms']:.2f} ms",
        )
    )
    rows.append(
        _row(
            "stream",
            "delay added to a token after the first (client), p50 / p99",
            f"{client['token_added_p50_ms']:.2f} / {client['token_added_p99_ms']:.2f} ms",
        )
    )
    rows.append(
        _row(
            "stream",
            "worker CPU per streamed job / per token",
            f"{client['worker_cpu_ms_per_job']} ms / {client['worker_cpu_us_per_token']} µs",
        )
    )
    return rows


def _stream_peers_rows() -> list[dict[str, Any]]:
    """Issue #15 item 6: llmq's gateway must beat LiteLLM Proxy on every figure.
    Lower is better for added latency and CPU (gateway + worker against the proxy's
    one process); for the highest rate sustained, not lower (the ladder has a top)."""
    r = _load("stream_peers")
    systems = (r or {}).get("systems", {})
    peer = next((n for n in ("litellm-proxy", "litellm-tuned") if n in systems), None)
    if r is None or "llmq-gateway" not in systems or peer is None:
        return []
    gw, lite = systems["llmq-gateway"], systems[peer]
    rate = r["plan"]["rates"][0]
    key = f"stream@{rate:g}"
    rows = []
    for q in ("p50", "p99"):
        # None: no streamed request succeeded, so there is no figure to compare.
        mine, theirs = (s["added"][key].get(f"ttft_{q}_ms") for s in (gw, lite))
        rows.append(
            _row(
                "stream_peers",
                f"TTFT added {q} at {rate:g}/s, gateway vs {peer}",
                " vs ".join("none ok" if v is None else f"{v:+.1f}" for v in (mine, theirs))
                + " ms",
                f"< {peer}",
                mine < theirs if mine is not None and theirs is not None else None,
                f"{mine - theirs:+.1f} ms" if mine is not None and theirs is not None else "",
            )
        )
    floor = r["plan"]["ladder"][0]
    for mode in ("plain", "stream"):
        mine, theirs = (s["max_sustained_per_s"][mode] or 0 for s in (gw, lite))
        rows.append(
            _row(
                "stream_peers",
                f"max sustained {mode} req/s (>= 99% ok), gateway vs {peer}",
                " vs ".join(f"{v:g}" if v else f"<{floor:g}" for v in (mine, theirs)),
                f">= {peer}",
                mine >= theirs,
            )
        )
    for mode in ("plain", "stream"):
        k = f"{mode}@{rate:g}"
        mine, theirs = (s["phases"][k]["cpu_ms_per_request"] for s in (gw, lite))
        alone = gw["phases"][k].get("cpu_ms_per_request_by_process", {}).get("gateway", 0.0)
        rows.append(
            _row(
                "stream_peers",
                f"CPU ms/request {k}, gateway+worker (gateway alone) vs {peer}",
                f"{mine:.2f} ({alone:.2f}) vs {theirs:.2f}",
                f"< {peer}",
                mine < theirs,
            )
        )
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("\nSummary" + (" (quick run)" if os.environ.get("BENCH_RESULT_SUFFIX") else ""))
    w = max((len(r["figure"]) for r in rows), default=20) + 2
    v = max((len(r["value"]) for r in rows), default=20) + 2
    print(f"{'benchmark':<13}{'figure':<{w}}{'value':<{v}}status")
    for r in rows:
        status = "" if r["met"] is None else ("met" if r["met"] else "MISSED")
        if r["by"]:
            status += f" ({r['by']})"
        print(f"{r['benchmark']:<13}{r['figure']:<{w}}{r['value']:<{v}}{status}")


def write_summary(status: dict[str, Any] | None) -> Path:
    rows = summary_rows()
    print_summary(rows)
    path = result_path("summary")
    path.parent.mkdir(parents=True, exist_ok=True)
    environment_now = environment()
    if status is None and path.exists():
        # A rebuild from the files on disk: the run it summarises is the last `all`.
        with contextlib.suppress(ValueError):
            before = json.loads(path.read_text())
            status, environment_now = before.get("runs"), before.get("environment")
    targets = [r for r in rows if r["met"] is not None]
    path.write_text(
        json.dumps(
            {
                "benchmark": "summary",
                "environment": environment_now,
                "runs": status,
                "targets_met": sum(bool(r["met"]) for r in targets),
                "targets_total": len(targets),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print("saved", path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    if quick:
        args.remove("--quick")
        os.environ["BENCH_RESULT_SUFFIX"] = "_quick"
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    name, extra = args[0], args[1:]
    if name == "all":
        status = run_all(quick)
        write_summary(status)
        failed = [
            k for k, v in status.items() if isinstance(v, dict) and v["status"].startswith("failed")
        ]
        return 1 if failed else 0
    if name == "summary":
        write_summary(None)
        return 0
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)}, all, summary")
        return 2
    module = BENCHMARKS[name][0]
    if not available(module):
        print(f"{name}: skipped ({module} is not there yet)")
        return 0
    run_one(name, quick, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
