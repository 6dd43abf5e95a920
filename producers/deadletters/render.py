"""How ``llmq dlq`` prints: rich tables and summaries, nothing else.

Everything a dead letter says (ids, codes, errors, models, headers) came from
a producer and is printed as plain text: rich markup in it is not interpreted
(``[/x]`` would raise) and control characters are escaped, so a dead letter
can neither crash the listing nor send escape sequences to the terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from producers.deadletters.actions import ReplayReport
from producers.deadletters.letters import DeadLetter, format_age

__all__ = ["console", "letters_table", "plain", "plural", "print_letter", "print_replay"]

_ERROR_WIDTH = 60
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def plain(value: object) -> Any:
    """Untrusted text as a rich ``Text``: no markup, control characters escaped."""
    from rich.text import Text

    return Text(str(value).translate(_CONTROL))


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
            plain(letter.job_id or "-"),
            plain(letter.model or "-"),
            plain(letter.code),
            "-" if letter.attempts is None else str(letter.attempts),
            format_age(letter.age_s(now_ms)),
            plain(letter.worker or ("(broker)" if letter.source == "broker" else "-")),
            plain(error),
        )
    return table


def print_letter(out: Any, summary: dict[str, Any], full: dict[str, Any]) -> None:
    """``show``: the summary, then properties, headers, the stored reply and the body."""
    from rich.json import JSON
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        table.add_row(key, plain("-" if value is None else value))
    out.print(table)
    for section in ("undecodable", "properties", "headers", "reply", "body"):
        if full.get(section) is not None:
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
                plain(row["job_id"] or "-"),
                plain(row["model"] or "-"),
                plain(row["code"]),
                str(row["replay_count"]),
                format_age(row["age_s"]),
                plain(row["replay_to"]),
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
        plain(
            f"replayed {report.replayed} of {report.matched} matching dead letters"
            f" (of {report.total}) to {jobs_exchange}: by code {codes}; by class {classes}"
        )
    )
    if report.duplicates:
        out.print(f"dropped {report.duplicates} extra copies of jobs already replayed")
    for reason, n in sorted(report.failed.items()):
        out.print(f"[red]not replayed ({reason}): {n}[/] — still in the dead-letter queue")
    if report.stopped:
        out.print(f"[red]stopped early: {report.stopped}[/]; the rest stays dead-lettered")
