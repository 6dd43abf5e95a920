"""``llmq dlq``: look at, replay and purge the dead-letter queue.

``list`` and ``show`` give every message back; ``replay`` and ``purge``
remove only what they match, ``replay`` only after the broker confirmed the
republish. How browsing works and what it costs: :mod:`producers.deadletters.queue`
and docs/dead-letters.md.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import click
import orjson

from producers.deadletters import render
from producers.deadletters.actions import ReplayReport, purge, replay
from producers.deadletters.letters import Filter, details, parse_duration
from producers.deadletters.queue import DlqError, browse
from schemas.errors import ErrorCode
from schemas.settings import ConfigError, Settings, load_settings

__all__ = ["dlq_group"]


class _Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _config(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG", help="llmq.toml"
    )(f)


_FILTERS = (
    click.option(
        "--code", "codes", multiple=True, help="Only this error code (repeatable): upstream_error."
    ),
    click.option("--model", "models", multiple=True, help="Only this model (repeatable)."),
    click.option(
        "--older-than", type=_Duration(), help="Only dead letters older than 30s, 10m, 2h, 1d."
    ),
    click.option(
        "--limit", type=click.IntRange(min=1), help="At most N, in queue order (oldest first)."
    ),
)


def _filters(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_FILTERS):
        f = option(f)
    return f


def _filter(
    codes: tuple[str, ...],
    older_than: float | None,
    models: tuple[str, ...] = (),
    limit: int | None = None,
) -> Filter:
    known = {c.value for c in ErrorCode}
    for code in codes:
        if code not in known:
            raise click.BadParameter(
                f"{code!r} is not an error code; one of {', '.join(sorted(known))}",
                param_hint="--code",
            )
    return Filter(frozenset(codes), frozenset(models), older_than, limit)


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _run(coro: Any) -> Any:
    import aiormq

    from schemas.broker.errors import BrokerFailure

    try:
        return asyncio.run(coro)
    except DlqError as exc:
        raise click.ClickException(str(exc)) from None
    except (aiormq.exceptions.AMQPError, ConnectionError, BrokerFailure) as exc:
        # Whatever this command still held, the broker has put back.
        raise click.ClickException(
            f"lost the broker connection ({type(exc).__name__}); dead letters not yet"
            " replayed or deleted are back in the dead-letter queue"
        ) from None


def _confirm(question: Callable[[int, int, bool], str], yes: bool) -> Any:
    """The ``confirm`` hook of replay and purge: a prompt in a thread (heartbeats go on)."""

    async def ask(matched: int, total: int, complete: bool) -> bool:
        if yes or (complete and matched == 0):
            return True
        try:
            return bool(
                await asyncio.to_thread(
                    click.confirm, question(matched, total, complete), default=False, err=True
                )
            )
        except click.Abort:
            return False

    return ask


def _how_many(matched: int, total: int, complete: bool) -> str:
    if complete:
        return f"{render.plural(matched, 'dead letter')} (of {total})"
    return f"the {matched} matching dead letters among the first of {total} (more may follow)"


@click.group("dlq")
def dlq_group() -> None:
    """Look at, replay and purge the dead-letter queue (llmq.dead)."""


@dlq_group.command("list")
@_config
@_filters
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
def list_command(
    config: str | None,
    codes: tuple[str, ...],
    older_than: float | None,
    models: tuple[str, ...],
    limit: int | None,
    as_json: bool,
) -> None:
    """Show the dead letters, oldest first; every one stays in the queue."""
    settings = _settings(config)
    flt = _filter(codes, older_than, models, limit)
    import time

    seen = _run(browse(settings, flt))
    now = int(time.time() * 1000)
    if as_json:
        click.echo(orjson.dumps([letter.row(now) for letter in seen.letters]).decode())
        return
    title = f"Dead letters in {settings.topology.dead_queue}"
    console = render.console()
    console.print(render.letters_table(seen.letters, now, title))
    shown = f"; showing {len(seen.letters)}" if len(seen.letters) < seen.matched else ""
    console.print(f"{seen.matched} of {seen.total} match ({flt.describe()}){shown}")


@dlq_group.command("show")
@_config
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def show_command(config: str | None, job_id: str, as_json: bool) -> None:
    """Show one dead letter in full: properties, headers, body."""
    import time

    settings = _settings(config)
    seen = _run(browse(settings, Filter(), job_id=job_id, keep_messages=True))
    if not seen.letters:
        raise click.ClickException(
            f"no dead letter with job id {job_id!r} in {settings.topology.dead_queue}"
        )
    letter, message = seen.letters[0], seen.messages[0]
    now = int(time.time() * 1000)
    summary = letter.row(now)
    full = {**summary, **details(message), "copies": len(seen.letters)}
    if as_json:
        click.echo(orjson.dumps(full).decode())
        return
    render.print_letter(render.console(), summary, full)


@dlq_group.command("replay")
@_config
@_filters
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), help="At most R republishes/s."
)
@click.option(
    "--sla-ms",
    type=click.IntRange(min=1),
    help="Latency budget of the replays [default: the original sla-ms, else the class default].",
)
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; send nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def replay_command(
    config: str | None,
    codes: tuple[str, ...],
    older_than: float | None,
    models: tuple[str, ...],
    limit: int | None,
    rate: float | None,
    sla_ms: int | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Republish matching dead letters as jobs: same job id, replay-count + 1, fresh deadline.

    Each dead letter is removed only after the broker confirmed its republish;
    killing the command loses nothing (a job may then exist twice: callers
    dedupe by job id).
    """
    settings = _settings(config)
    flt = _filter(codes, older_than, models, limit)
    jobs = settings.topology.jobs_exchange

    def question(matched: int, total: int, complete: bool) -> str:
        return f"Replay {_how_many(matched, total, complete)} to {jobs}?"

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=render.console(stderr=True),
        disable=dry_run,
    )
    task = bar.add_task("replaying", total=None)

    def progress(report: ReplayReport) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, total=report.matched, completed=report.done)

    try:
        report = _run(
            replay(
                settings,
                flt,
                rate=rate,
                sla_ms=sla_ms,
                dry_run=dry_run,
                confirm=_confirm(question, yes or dry_run),
                progress=progress,
            )
        )
    finally:
        bar.stop()
    render.print_replay(render.console(), report, settings.topology.jobs_exchange)
    if report.failed or report.stopped:
        sys.exit(1)


@dlq_group.command("purge")
@_config
@_filters
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge_command(
    config: str | None,
    codes: tuple[str, ...],
    older_than: float | None,
    models: tuple[str, ...],
    limit: int | None,
    yes: bool,
) -> None:
    """Delete matching dead letters for good (after a confirmation)."""
    settings = _settings(config)
    flt = _filter(codes, older_than, models, limit)
    queue = settings.topology.dead_queue

    def question(matched: int, total: int, complete: bool) -> str:
        return f"Delete {_how_many(matched, total, complete)} from {queue}? This cannot be undone."

    report = _run(purge(settings, flt, confirm=_confirm(question, yes)))
    if report.cancelled:
        click.echo("cancelled: nothing was deleted")
        return
    click.echo(
        f"deleted {render.plural(report.deleted, 'dead letter')} ({flt.describe()})"
        f" of {report.total} in {queue}"
    )
