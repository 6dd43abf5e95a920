"""How ``llmq dlq`` prints: rich tables and summaries, nothing else."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from producers.dlq_actions import ReplayReport
from producers.dlq_letters import DeadLetter, format_age

__all__ = ["console", "letters_table", "plural", "print_letter", "print_replay"]

_ERROR_WIDTH = 60


def console(stderr: bool = False) -> Any:
    """A rich console; piped, 240 columns wide (rich would assume 80 and squeeze tables)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 240
    return Console(stderr=stderr, highlight=False, width=width)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def letters_table(letters: Iterable[DeadLetter], now_ms: int, title: str) -> Any:
    """The ``list`` table: one row per dead letter, the error cut to one short line."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("job id", "model", "code", "attempts", "age", "worker"):
        right = col in ("attempts", "age")
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    table.add_column("error", overflow="fold", min_width=20)
    for letter in letters:
        error = letter.error
        if len(error) > _ERROR_WIDTH:
            error = error[: _ERROR_WIDTH - 1] + "…"
        table.add_row(
            letter.job_id or "-",
            letter.model or "-",
            letter.code,
            "-" if letter.attempts is None else str(letter.attempts),
            format_age(letter.age_s(now_ms)),
            letter.worker or ("(broker)" if letter.source == "broker" else "-"),
            error,
        )
    return table


def print_letter(out: Any, summary: dict[str, Any], full: dict[str, Any]) -> None:
    """``show``: the summary, then properties, headers, the stored reply and the body."""
    from rich.json import JSON
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        table.add_row(key, "-" if value is None else str(value))
    out.print(table)
    for section in ("properties", "headers", "reply", "body"):
        if full[section] is not None:
            out.rule(section)
            out.print(JSON.from_data(full[section]))
    if full["copies"] > 1:
        out.print(f"{full['copies'] - 1} more copies of this job are in the queue")


def print_replay(out: Any, report: ReplayReport, jobs_exchange: str) -> None:
    """The end of ``replay``: a dry run's table, or what was sent and what was not."""
    if report.dry_run:
        from rich.table import Table

        table = Table(title="Would replay (dry run: nothing was sent)")
        for col in ("job id", "model", "code", "replays", "age", "to class"):
            table.add_column(col, no_wrap=True)
        for row in report.planned:
            table.add_row(
                row["job_id"] or "-",
                row["model"] or "-",
                row["code"],
                str(row["replay_count"]),
                format_age(row["age_s"]),
                row["replay_to"],
            )
        out.print(table)
        out.print(f"{report.matched} of {plural(report.total, 'dead letter')} match")
        return
    if report.cancelled:
        out.print("cancelled: nothing was replayed")
        return
    codes = ", ".join(f"{k}={v}" for k, v in sorted(report.by_code.items())) or "-"
    classes = ", ".join(f"{k}={v}" for k, v in sorted(report.by_class.items())) or "-"
    out.print(
        f"replayed {report.replayed} of {report.matched} matching dead letters"
        f" (of {report.total}) to {jobs_exchange}: by code {codes}; by class {classes}"
    )
    if report.duplicates:
        out.print(f"dropped {report.duplicates} extra copies of jobs already replayed")
    for reason, n in sorted(report.failed.items()):
        out.print(f"[red]not replayed ({reason}): {n}[/] — still in the dead-letter queue")
    if report.stopped:
        out.print(f"[red]stopped early: {report.stopped}[/]; the rest stays dead-lettered")
