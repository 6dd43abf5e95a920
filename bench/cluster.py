"""What a three-node cluster costs: one llmq worker on a single RabbitMQ 4.x node
and on a three-node 4.x cluster, side by side in one run.

The same comparison as ``bench.overhead`` (closed-loop max jobs/s, open-loop
latency at 25/50/75% of a reference rate, worker CPU), on four systems that
all stay up, idle, and are driven one at a time in alternating order:

* ``echo-node`` / ``llmq-node``: the http-echo ceiling and one ``llmq worker``
  on the single 4.x node of ``scripts/rabbitmq4`` (port 5680);
* ``echo-cluster`` / ``llmq-cluster``: the same on the three-node 4.x cluster
  of ``scripts/cluster`` (5691-5693). The load generator, the echo and the
  topology declaration use node 1 (so node 1 leads the work queue, client-local
  placement); the worker is given all three addresses, as in production, and
  connects to one of them at random.

Quorum queues confirm a publish once a majority has written it: on one node
that is the node itself, on three it is a round trip to a second node. The
difference between the rows is that cost. The open-loop rates are 25% and 50%
of ``llmq-cluster``'s max (the slowest system), so every system sees the same
rates and none of them is saturated. Brokers not
running are started (and stopped again at the end); both share this
machine's two cores with everything else.

    python -m bench.cluster [--quick] [--rounds N]

Writes bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.ceiling import (
    Options,
    System,
    print_table,
    run_comparison,
    start_echo,
    strip_raw,
)
from bench.harness import llmq_config, quick_results, save, start_worker
from bench.overhead import LLMQ_CONCURRENCY, compare, print_comparison
from bench.routing_routers import MODEL

ROOT = Path(__file__).resolve().parents[1]
NODE_PORT = 5680
CLUSTER_PORTS = (5691, 5692, 5693)


def _script(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"scripts/{' '.join(args)}: {done.stderr.strip()[-500:]}")
    return done.stdout


@contextlib.contextmanager
def brokers() -> Iterator[None]:
    """The 4.x node and the 4.x cluster up; what this started is stopped after."""
    started: list[tuple[str, ...]] = []
    if "running" not in _script("rabbitmq4", "status", check=False):
        _script("rabbitmq4", "start")
        started.append(("rabbitmq4", "stop"))
    if _script("cluster", "4", "status", check=False).count("running") < 3:
        _script("cluster", "4", "start")
        started.append(("cluster", "4", "stop"))
    try:
        yield
    finally:
        for command in started:
            _script(*command, check=False)


def _name() -> str:
    return f"llmq-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def node_vhost() -> Iterator[str]:
    name = _name()
    _script("rabbitmq4", "ctl", "add_vhost", name)
    _script("rabbitmq4", "ctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:{NODE_PORT}/{name}"
    finally:
        _script("rabbitmq4", "ctl", "delete_vhost", name, check=False)


@contextlib.contextmanager
def cluster_vhost() -> Iterator[str]:
    name = _name()
    _script("cluster", "4", "add-vhost", name)
    try:
        yield ",".join(f"amqp://guest:guest@127.0.0.1:{p}/{name}" for p in CLUSTER_PORTS)
    finally:
        _script("cluster", "4", "delete-vhost", name, check=False)


def _echo(url: str, urls: dict[str, str], tmp: Path) -> list[subprocess.Popen[Any]]:
    return [start_echo(url.split(",")[0], next(iter(urls.values())) + "/chat/completions")]


def _llmq(url: str, urls: dict[str, str], tmp: Path) -> list[subprocess.Popen[Any]]:
    tag = uuid.uuid4().hex[:6]
    config = llmq_config(tmp / f"llmq-{tag}.toml", url, urls, [MODEL], concurrency=LLMQ_CONCURRENCY)
    return [start_worker(config, f"bench-cluster-{tag}")]


def systems() -> list[System]:
    def on_node(name: str, kind: str, start: Any, note: str) -> System:
        return System(name, kind, 1, start, note, vhost=node_vhost, broker_ports=(NODE_PORT,))

    def on_cluster(name: str, kind: str, start: Any, note: str) -> System:
        return System(name, kind, 1, start, note, vhost=cluster_vhost, broker_ports=CLUSTER_PORTS)

    return [
        on_node("echo-node", "ceiling", _echo, "http-echo, 4.x single node"),
        on_node("llmq-node", "llmq", _llmq, "1 llmq worker, 4.x single node"),
        on_cluster("echo-cluster", "ceiling", _echo, "http-echo, 4.x 3-node cluster"),
        on_cluster("llmq-cluster", "llmq", _llmq, "1 llmq worker, 4.x 3-node cluster"),
    ]


def cluster_cost(result: dict[str, Any]) -> dict[str, Any]:
    """The cluster's rows minus the single node's, for llmq and for the ceiling."""
    s = result["systems"]
    out: dict[str, Any] = {}
    pairs = (("llmq", "llmq-node", "llmq-cluster"), ("echo", "echo-node", "echo-cluster"))
    for kind, node, cluster in pairs:
        a, b = s[node], s[cluster]
        row: dict[str, Any] = {
            "max_jobs_per_s": [a["max_jobs_per_s"], b["max_jobs_per_s"]],
            "throughput_ratio": round(b["max_jobs_per_s"] / a["max_jobs_per_s"], 3),
        }
        for f, point in a["open_loop"].items():
            mine, theirs = b["open_loop"][f]["latency"], point["latency"]
            if mine.get("count") and theirs.get("count"):
                row[f"added_at_{f}"] = {
                    k: round(mine[k] - theirs[k], 3) for k in ("p50_ms", "p99_ms")
                }
        out[kind] = row
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
    options = Options.quick() if args.quick else Options()
    # Rates both brokers sustain: fractions of the slower system's max, so the
    # latencies compare the brokers' paths, not one of them saturated.
    options.reference = "llmq-cluster"
    options.fractions = (0.25, 0.5) if not args.quick else (0.5,)
    if args.rounds:
        options.rounds = args.rounds
    t0 = time.perf_counter()
    with brokers():
        result = run_comparison(systems(), options)
    print_table(result)
    # Each llmq row against the echo ceiling on the same broker only.
    result["comparison"] = {
        name: {ref: c for ref, c in refs.items() if ref.split("-")[-1] == name.split("-")[-1]}
        for name, refs in compare(result).items()
    }
    result["cluster_cost"] = cluster_cost(result)
    result["targets"] = []
    print_comparison(result)
    print("the cluster's cost (3-node cluster minus single node, same rates):")
    for kind, row in result["cluster_cost"].items():
        added = "  ".join(
            f"{k.removeprefix('added_at_')}: {v['p50_ms']:+.2f} / {v['p99_ms']:+.2f} ms"
            for k, v in row.items()
            if k.startswith("added_at_")
        )
        print(
            f"  {kind:<5} jobs/s {row['max_jobs_per_s'][0]:.0f} -> {row['max_jobs_per_s'][1]:.0f}"
            f" (x{row['throughput_ratio']:.2f}); added p50 / p99 at {added}"
        )
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print("saved", save("cluster", strip_raw(result)))


if __name__ == "__main__":
    main()
