"""``llmq demo``: the whole path on the built-in fake fleet, no API keys.

Starts the fleet of the shipped ``demo`` scenario
(workers/fleet/scenarios/demo.toml) in a subprocess, runs a worker with the
demo's configuration (llmq_cli/demo.toml, beside this module) in this
process (so it can show circuit states), sends a burst of jobs through the
broker with ``LlmqClient`` and prints what happened per endpoint, with lost =
jobs without a reply. Both files are package data: an installed wheel runs
the demo from any directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import click
import orjson

from producers.quantiles import nearest_rank
from schemas import event_loop
from schemas.broker.connection import open_connection
from schemas.contract import JobKind
from schemas.settings import ConfigError, Settings, load_settings

__all__ = ["demo_command", "run_demo", "summarise"]

DEMO_CONFIG = "demo.toml"
"""The demo's worker configuration, package data beside this module."""
FLEET_KEY_ENV = "LLMQ_FLEET_KEY"
FLEET_KEY = "sk-fleet-demo"  # the fake fleet's key, not a secret
_PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "Write a haiku about message queues.",
    "Explain deadlines versus timeouts to a new engineer.",
    "List three ways to make retries safe.",
    "Translate 'the queue absorbs the burst' into French.",
)


def summarise(
    jobs: int,
    replies: dict[str, dict[str, Any]],
    latencies: dict[str, float],
    dead_letters: int,
    circuits: dict[str, str],
) -> dict[str, Any]:
    """The demo's outcome as one JSON-able object."""
    ok = [r for r in replies.values() if r.get("status") == "ok"]
    errors: dict[str, int] = {}
    for r in replies.values():
        if r.get("status") != "ok":
            code = (r.get("error") or {}).get("code", "?")
            errors[code] = errors.get(code, 0) + 1
    endpoints: dict[str, Any] = {}
    names = sorted({*circuits, *(r["routing"].get("endpoint") or "" for r in ok)} - {""})
    for name in names:
        served = [r for r in replies.values() if (r.get("routing") or {}).get("endpoint") == name]
        good = [r for r in served if r["status"] == "ok"]
        # Per endpoint: its own latency (upstream_ms); queueing shows in the totals.
        lat = [r["routing"]["upstream_ms"] for r in good if r["routing"].get("upstream_ms")]
        endpoints[name] = {
            "share": round(len(good) / max(1, len(ok)), 4),
            "jobs": len(good),
            "p50_ms": _round(nearest_rank(lat, 0.5)),
            "p99_ms": _round(nearest_rank(lat, 0.99)),
            "errors": len(served) - len(good),
            "circuit": circuits.get(name, "?"),
        }
    all_lat = [latencies[j] for j in replies if j in latencies]
    return {
        "jobs": jobs,
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_code": errors,
        "dead_letters": dead_letters,
        "lost": jobs - len(replies),
        "hedged": sum(1 for r in replies.values() if (r.get("routing") or {}).get("hedged")),
        "attempts_per_job": round(
            sum((r.get("routing") or {}).get("attempts", 0) for r in replies.values())
            / max(1, len(replies)),
            3,
        ),
        "p50_ms": _round(nearest_rank(all_lat, 0.5)),
        "p99_ms": _round(nearest_rank(all_lat, 0.99)),
        "endpoints": endpoints,
    }


def _pick_model(draw: float) -> tuple[str, JobKind]:
    """The demo's mix: mostly gpt-4.1-mini, some gpt-4.1 (alias gpt4; served by the
    OpenAI-style endpoints and Azure), some Claude (native Messages API) and some
    embeddings."""
    if draw < 0.65:
        return "gpt-4.1-mini", JobKind.CHAT
    if draw < 0.8:
        return "gpt4", JobKind.CHAT
    if draw < 0.9:
        return "claude-haiku", JobKind.CHAT
    return "text-embedding-3-small", JobKind.EMBEDDING


def _severity(state: str) -> int:
    order = ("closed", "half_open", "cooldown", "open", "unusable")
    return order.index(state) if state in order else len(order)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _wait_for_ports(ports: list[int], proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    give_up = time.monotonic() + timeout_s
    for port in ports:
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if proc.poll() is not None or time.monotonic() > give_up:
                why = _last_line(proc) if proc.poll() is not None else ""
                raise click.ClickException(f"the fake fleet did not start (port {port}){why}")
            time.sleep(0.1)


def _last_line(proc: subprocess.Popen[bytes]) -> str:
    """The exited fleet's last line on stderr (its error), as ``: text``."""
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
    return f": {err.splitlines()[-1].removeprefix('Error: ')}" if err else ""


async def _count_dead_letters(settings: Settings, prefix: str) -> int:
    """Count this run's dead letters without removing anyone's: look, then requeue all."""
    import aio_pika

    connection = await open_connection(settings.broker.addresses, name="llmq-demo")
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.topology.dead_queue, ensure=False)
        held: list[aio_pika.abc.AbstractIncomingMessage] = []
        ours = 0
        while len(held) < 1_000_000:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
            ours += (message.message_id or "").startswith(prefix)
        for message in held:
            await message.nack(requeue=True)
        return ours
    finally:
        await connection.close()


async def run_demo(
    settings: Settings, *, jobs: int, bad: int, sla_ms: int, quiet: bool
) -> dict[str, Any]:
    """Run a worker here, send ``jobs`` jobs (``bad`` of them for an unknown model)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from producers.client import LlmqClient
    from workers.service import Worker

    # Two workers, so `llmq status` (in another terminal) shows a shared view;
    # metrics on free ports so a worker run by hand keeps the default one.
    free = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"port": 0})})
    workers = [Worker(free, name=f"demo-worker-{i}") for i in (1, 2)]
    for worker in workers:
        await worker.start()
        if not quiet:
            print(f"{worker.name}: metrics on http://127.0.0.1:{worker.metrics_port}/metrics")
    run = f"demo-{uuid.uuid4().hex[:8]}-"
    rng = random.Random(7)
    replies: dict[str, dict[str, Any]] = {}
    latencies: dict[str, float] = {}
    try:
        async with LlmqClient(
            settings.broker.addresses,
            exchange=settings.topology.jobs_exchange,
            default_sla_ms=sla_ms,
        ) as client:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=quiet,
                transient=False,
            ) as progress:
                bar = progress.add_task("jobs answered", total=jobs)

                async def one(i: int) -> None:
                    job_id = f"{run}{i}"
                    model, kind = _pick_model(rng.random())
                    if i < bad:
                        model, kind = "no-such-model", JobKind.CHAT
                    prompt = rng.choice(_PROMPTS)
                    body: dict[str, Any] = (
                        {"model": model, "input": [prompt, prompt[::-1]]}
                        if kind is JobKind.EMBEDDING
                        else {
                            "model": model,
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": rng.choice((32, 64, 128, 256)),
                        }
                    )
                    started = time.monotonic()
                    with contextlib.suppress(Exception):
                        replies[job_id] = await client.call(body, job_id=job_id, kind=kind)
                        latencies[job_id] = (time.monotonic() - started) * 1000
                    progress.advance(bar)

                await asyncio.gather(*(one(i) for i in range(jobs)))
    finally:
        circuits: dict[str, str] = {}
        for worker in workers:
            for status in worker.router.snapshot(now=time.monotonic()):
                # The worst state any worker sees ("closed" sorts first).
                seen = circuits.get(status.name, "closed")
                circuits[status.name] = max(seen, status.state, key=_severity)
        for worker in workers:
            await worker.stop(grace_s=10)
    dead = await _count_dead_letters(settings, run)
    return summarise(jobs, replies, latencies, dead, circuits)


def _print_summary(summary: dict[str, Any], config: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Per endpoint")
    for col in ("endpoint", "share", "jobs", "upstream p50 ms", "p99 ms", "errors", "circuit"):
        table.add_column(col, justify="left" if col in ("endpoint", "circuit") else "right")
    for name, e in summary["endpoints"].items():
        table.add_row(
            name,
            f"{e['share']:.1%}",
            str(e["jobs"]),
            str(e["p50_ms"]),
            str(e["p99_ms"]),
            str(e["errors"]),
            e["circuit"],
        )
    console.print(table)
    totals = Table(title="Totals (latency: submit to reply, including queueing)")
    for col in (
        "jobs",
        "ok",
        "errors",
        "dead letters",
        "lost",
        "hedged",
        "attempts/job",
        "p50 ms",
        "p99 ms",
    ):
        totals.add_column(col, justify="right")
    totals.add_row(
        *(
            str(summary[k])
            for k in (
                "jobs",
                "ok",
                "errors",
                "dead_letters",
                "lost",
                "hedged",
                "attempts_per_job",
                "p50_ms",
                "p99_ms",
            )
        )
    )
    console.print(totals)
    if summary["errors_by_code"]:
        console.print(
            "errors by code: "
            + ", ".join(f"{k}={v}" for k, v in sorted(summary["errors_by_code"].items()))
        )
    verdict = (
        "[green]nothing lost[/]" if summary["lost"] == 0 else f"[red]{summary['lost']} LOST[/]"
    )
    console.print(f"{verdict} — see the dead letters: llmq dlq list --config {config}")


@click.command("demo")
@click.option("--jobs", default=2000, show_default=True, help="Jobs in the burst.")
@click.option(
    "--bad", default=5, show_default=True, help="Jobs for an unknown model (dead-lettered)."
)
@click.option("--sla-ms", default=30_000, show_default=True, help="Latency budget per job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Worker config for the demo fleet.  [default: the shipped llmq_cli/demo.toml]",
)
@click.option(
    "--scenario",
    default="demo",
    show_default=True,
    help="The fleet: a shipped scenario (demo, faults, zero) or a scenario TOML file.",
)
def demo_command(
    jobs: int, bad: int, sla_ms: int, as_json: bool, config: Path | None, scenario: str
) -> None:
    """Fake fleet + worker + a burst of jobs; prints routing per endpoint and lost = 0."""
    os.environ.setdefault(FLEET_KEY_ENV, FLEET_KEY)
    with contextlib.ExitStack() as files:
        try:
            if config is None:
                config = files.enter_context(resources.as_file(_demo_config()))
            settings = load_settings(config)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        summary = _run(settings, scenario, jobs=jobs, bad=bad, sla_ms=sla_ms, quiet=as_json)
    if as_json:
        click.echo(orjson.dumps(summary).decode())
    else:
        _print_summary(summary, config)
    if summary["lost"]:
        sys.exit(1)


def _demo_config() -> Traversable:
    return resources.files(__name__.rpartition(".")[0]) / DEMO_CONFIG


def _run(
    settings: Settings, scenario: str, *, jobs: int, bad: int, sla_ms: int, quiet: bool
) -> dict[str, Any]:
    """Serve the fleet in a subprocess while :func:`run_demo` runs here.

    ``scenario`` goes to ``python -m workers.fleet`` as given: the fleet
    resolves shipped names itself.
    """
    from schemas.logs import setup_logging

    setup_logging("warning")
    ports = [int(e.base_url.rsplit(":", 1)[1].split("/")[0]) for e in settings.endpoints]
    fleet = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "workers.fleet", "--scenario", scenario],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_ports(ports, fleet, timeout_s=20)
        if not quiet:
            click.echo(f"fleet up on ports {', '.join(map(str, ports))}; sending {jobs} jobs")
        return event_loop.run(run_demo(settings, jobs=jobs, bad=bad, sla_ms=sla_ms, quiet=quiet))
    except OSError as exc:
        raise click.ClickException(f"cannot reach the broker: {exc}") from None
    finally:
        fleet.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            fleet.wait(timeout=10)
