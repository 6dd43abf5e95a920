"""``llmq probe``: each endpoint's latency baseline, measured directly (not via the broker).

For every configured endpoint (or those named with ``--endpoint``), send
``--requests`` small chat completions (embeddings, for an embedding model),
``--concurrency`` at a time, with the worker's own HTTP transport, the
endpoint's provider adapter and its key, and report p50/p95/p99
latency, the error rate (and the failure kinds), and tokens per second.
Endpoints are probed one after another so they do not slow each other down.

Exit status: 0, or 1 when some endpoint failed every request.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click
import orjson

from schemas.contract import JobKind
from schemas.settings import ConfigError, EndpointSettings, Settings, load_settings
from workers.errors import UpstreamFailure
from workers.providers import Adapter, Call, adapter_for
from workers.upstream import Upstream, make_upstream, require_transport

__all__ = ["Sample", "percentile", "probe", "probe_command", "summarize"]

PROMPT = "Reply with one short sentence about the sea."


@dataclass(frozen=True, slots=True)
class Sample:
    """One probe request: how long it took and what came back."""

    seconds: float
    completion_tokens: int | None = None
    failure: str | None = None
    """None when ok, else the failure kind (``server_error``, ``timeout``, …)."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0–1) of ``values``, linearly interpolated; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(
    endpoint: str, model: str, samples: Sequence[Sample], wall_s: float
) -> dict[str, Any]:
    """One endpoint's result row (latencies of successful requests, in ms)."""
    ok = [s for s in samples if s.failure is None]
    latencies = [s.seconds for s in ok]
    kinds: dict[str, int] = {}
    for s in samples:
        if s.failure is not None:
            kinds[s.failure] = kinds.get(s.failure, 0) + 1
    tokens = sum(s.completion_tokens or 0 for s in ok)
    busy = sum(latencies)

    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value * 1000, 2)

    return {
        "endpoint": endpoint,
        "model": model,
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "error_rate": round((len(samples) - len(ok)) / len(samples), 4) if samples else 0.0,
        "failures": dict(sorted(kinds.items())),
        "p50_ms": ms(0.50),
        "p95_ms": ms(0.95),
        "p99_ms": ms(0.99),
        "tokens_per_s": round(tokens / busy, 2) if busy > 0 else None,
        "throughput_tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "wall_s": round(wall_s, 3),
    }


async def _probe_one(
    upstream: Upstream,
    adapter: Adapter,
    kind: JobKind,
    call: Call,
    *,
    requests: int,
    concurrency: int,
    timeout_s: float,
    advance: Callable[[], None],
) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    left = iter(range(requests))

    async def lane() -> None:
        for _ in left:
            start = time.perf_counter()
            try:
                reply = await upstream.send(adapter, kind, call, timeout_s=timeout_s)
            except UpstreamFailure as exc:
                samples.append(Sample(time.perf_counter() - start, failure=exc.kind.value))
            else:
                samples.append(Sample(time.perf_counter() - start, reply.completion_tokens))
            advance()

    start = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(concurrency, requests))))
    return samples, time.perf_counter() - start


def _request(kind: JobKind, max_tokens: int) -> dict[str, Any]:
    """A small request of ``kind``: a short chat, or one sentence to embed."""
    if kind is JobKind.EMBEDDING:
        return {"input": PROMPT}
    return {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}


def _model_for(endpoint: EndpointSettings, model: str | None) -> tuple[str, str] | None:
    """(canonical, upstream) model to probe ``endpoint`` with; None if it doesn't serve it."""
    if model is None:
        name = next(iter(endpoint.models))
        return name, endpoint.models[name].upstream
    if model in endpoint.models:
        return model, endpoint.models[model].upstream
    return None


async def probe(
    settings: Settings,
    *,
    requests: int = 20,
    concurrency: int = 4,
    max_tokens: int = 32,
    model: str | None = None,
    only: Sequence[str] = (),
    timeout_s: float | None = None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Probe the endpoints; one summary row each (see :func:`summarize`).

    ``progress`` is an optional ``rich.progress.Progress``; one task per endpoint.
    """
    endpoints = [e for e in settings.endpoints if not only or e.name in only]
    upstream = make_upstream(settings.worker.http_transport)
    rows = []
    try:
        plan = []
        for endpoint in endpoints:
            chosen = _model_for(endpoint, None if model is None else settings.canonical(model))
            if chosen is None:
                continue
            task = (
                progress.add_task(f"{endpoint.name} ({chosen[0]})", total=requests)
                if progress is not None
                else None
            )
            plan.append((endpoint, chosen, task))
        for endpoint, (canonical, upstream_model), task in plan:
            kind = JobKind(endpoint.models[canonical].kind)
            adapter = adapter_for(endpoint)
            call = adapter.call(kind, _request(kind, max_tokens), upstream_model)

            def advance(task: Any = task) -> None:
                if progress is not None:
                    progress.advance(task)

            samples, wall = await _probe_one(
                upstream,
                adapter,
                kind,
                call,
                requests=requests,
                concurrency=concurrency,
                timeout_s=timeout_s or endpoint.timeout_s,
                advance=advance,
            )
            rows.append(summarize(endpoint.name, canonical, samples, wall))
    finally:
        await upstream.aclose()
    return rows


def render(rows: list[dict[str, Any]]) -> Any:
    """The results as a rich table."""
    from rich.table import Table

    table = Table(title="Endpoint latency baseline", title_justify="left")
    for col in ("endpoint", "model", "ok", "error rate", "p50", "p95", "p99", "tokens/s"):
        table.add_column(col, justify="left" if col in ("endpoint", "model") else "right")
    table.add_column("failures")

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.0f} ms"

    for r in rows:
        table.add_row(
            r["endpoint"],
            r["model"],
            f"{r['ok']}/{r['requests']}",
            f"{r['error_rate'] * 100:.1f}%",
            ms(r["p50_ms"]),
            ms(r["p95_ms"]),
            ms(r["p99_ms"]),
            "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
            ", ".join(f"{k}:{n}" for k, n in r["failures"].items()),
        )
    return table


@click.command("probe")
@click.option("--config", "config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
@click.option("--requests", "-n", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--concurrency", "-c", type=click.IntRange(1, 1000), default=4, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1, 100_000), default=32, show_default=True)
@click.option("--model", default=None, help="Probe this model (default: each endpoint's first).")
@click.option("--endpoint", "only", multiple=True, help="Only this endpoint (repeatable).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.001, 3600), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def probe_command(
    config: str | None,
    requests: int,
    concurrency: int,
    max_tokens: int,
    model: str | None,
    only: tuple[str, ...],
    timeout_s: float | None,
    as_json: bool,
) -> None:
    """Measure each endpoint's latency (p50/p95/p99), error rate and tokens/s directly."""
    try:
        settings = load_settings(config)
        require_transport(settings.worker.http_transport)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    unknown = sorted(set(only) - {e.name for e in settings.endpoints})
    if unknown:
        raise click.ClickException(f"no endpoint named {unknown[0]!r}")
    if not settings.endpoints:
        raise click.ClickException("config error: endpoints: no endpoints configured")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    err = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        rows = asyncio.run(
            probe(
                settings,
                requests=requests,
                concurrency=concurrency,
                max_tokens=max_tokens,
                model=model,
                only=only,
                timeout_s=timeout_s,
                progress=progress,
            )
        )
    if not rows:
        raise click.ClickException(f"no endpoint serves model {model!r}")
    if as_json:
        click.echo(orjson.dumps({"endpoints": rows}, option=orjson.OPT_INDENT_2).decode())
    else:
        Console().print(render(rows))
    if any(r["ok"] == 0 for r in rows):
        sys.exit(1)
