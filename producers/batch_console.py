"""The terminal side of ``llmq submit --openai-batch``: files opened, a progress
bar with ETA, a summary, and the exit status (the run itself: :mod:`producers.openai_batch`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from producers.batch_file import BatchFileError, OutputFile, read_batch
from producers.openai_batch import BatchRun, BatchSummary, batch_key, default_prefix
from producers.submit import SubmitError, quiet_client_exit
from schemas.contract import JOB_ID_RE
from schemas.settings import Settings

__all__ = [
    "EXIT_ERRORS",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "BatchOptions",
    "run_batch_command",
]

EXIT_OK = 0
"""Every line of the batch is in the output, and ok."""
EXIT_ERRORS = 1
"""Every line is in the output; some with an error."""
EXIT_INCOMPLETE = 75
"""Lines are missing (the broker did not take their jobs): run the command again."""
EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class BatchOptions:
    input: Path
    output: Path
    sla_class: str
    sla_ms: int | None = None
    rate: float | None = None
    tenant: str | None = None
    id_prefix: str | None = None


def run_batch_command(settings: Settings, options: BatchOptions, *, quiet: bool) -> int:
    """Run (or continue) a batch, with a bar and a summary on stderr; the exit status."""
    from rich.console import Console

    try:
        batch = read_batch(options.input)
    except BatchFileError as exc:
        raise click.ClickException(str(exc)) from None
    key = batch_key(batch, options.output, options.id_prefix)
    prefix = options.id_prefix or default_prefix(key)
    if not JOB_ID_RE.match(prefix + "sha256=" + "0" * 32):
        raise click.UsageError(
            "--id-prefix must start with a letter or digit, use only letters, digits and"
            " ._:@/+=- and leave room for a custom_id (at most 89 characters)"
        )
    try:
        output = OutputFile(options.output, batch)
    except BatchFileError as exc:
        raise click.ClickException(str(exc)) from None
    console = Console(stderr=True, highlight=False)
    interrupted = False
    try:
        run = BatchRun(
            settings, batch, output, key=key, prefix=prefix, sla_class=options.sla_class,
            sla_ms=options.sla_ms, tenant=options.tenant,
        )  # fmt: skip
        run.on_progress, bar = _progress_bar(console, total=len(run.todo), quiet=quiet)
        try:
            with quiet_client_exit():
                asyncio.run(run.run(rate=options.rate))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.stop()
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the broker: {type(exc).__name__}") from None
    finally:
        output.close()
    if not quiet:
        _print_summary(run.summary, console, output=options.output, interrupted=interrupted)
    return exit_status(run.summary, interrupted=interrupted)


def exit_status(summary: BatchSummary, *, interrupted: bool = False) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    if not summary.complete:
        return EXIT_INCOMPLETE
    return EXIT_OK if summary.ok else EXIT_ERRORS


def _progress_bar(
    console: Any, *, total: int, quiet: bool
) -> tuple[Callable[[BatchSummary], None], Any]:
    """A bar with ETA over the lines this run has to write, and the callback that moves it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        "eta",
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        redirect_stdout=False,
    )
    task = bar.add_task("written", total=total)

    def on_progress(summary: BatchSummary) -> None:
        errors = sum(summary.now.errors.values())
        note = f" ({errors} with errors)" if errors else ""
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=summary.now.total, description="written" + note)

    return on_progress, bar


def _print_summary(summary: BatchSummary, console: Any, *, output: Path, interrupted: bool) -> None:
    from rich.table import Table

    submit = summary.submit
    table = Table(title="llmq submit --openai-batch")
    unsent = sum(summary.unsent.values())
    row: dict[str, object] = {
        "lines": summary.lines,
        "done before": summary.before.total,
        "written now": summary.now.total,
        "ok": summary.now.ok,
        "errors": sum(summary.now.errors.values()),
        "not sent": unsent,
        "backpressure": submit.backpressure,
        "seconds": round(submit.elapsed_s, 1),
    }
    for column in row:
        table.add_column(column, justify="right")
    table.add_row(*(str(v) for v in row.values()))
    console.print(table)
    errors: dict[str, int] = dict(summary.before.errors)
    for code, n in summary.now.errors.items():
        errors[code] = errors.get(code, 0) + n
    if errors:
        console.print(
            f"errors in {output} by code: "
            + ", ".join(f"{k}={v}" for k, v in sorted(errors.items()))
        )
    missing = summary.lines - summary.before.total - summary.now.total
    if summary.complete:
        console.print(f"{output}: complete, {summary.lines} lines")
    else:
        why = "interrupted" if interrupted else _why_unsent(summary)
        console.print(
            f"[yellow]{output}: {missing} of {summary.lines} lines still missing ({why});"
            " run the same command again to continue[/]"
        )


def _why_unsent(summary: BatchSummary) -> str:
    reasons = {
        "backpressure": "the queue stayed full",
        "publish_failed": "the broker did not confirm",
        "unroutable": "no queue for the class",
    }
    named = [reasons.get(r, r) for r in summary.unsent]
    return "not sent: " + ", ".join(named) if named else "not answered"
