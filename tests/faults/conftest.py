"""The fault suite's bookkeeping: every job id published is accounted for.

Each case records what it published and what came back; at the end of the
session a table of the figures is printed (docs/reliability.md copies it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from harness import RESULTS, Ledger


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Ledger:
    doc = (request.function.__doc__ or "").strip().splitlines()
    return Ledger(case=request.node.name.removeprefix("test_"), fault=doc[0] if doc else "")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    cols = ["case", "fault", "published", "ok", "errors", "dead_letters", "duplicates", "lost"]
    # Cluster cases (test_cluster.py) also say how long throughput took to recover.
    extra = ["recovery_s", "longest_gap_s", "publish_errors", "slowest_confirm_s"]
    single = [r for r in RESULTS if "recovery_s" not in r]
    cluster = [r for r in RESULTS if "recovery_s" in r]
    for title, rows, columns in (
        ("fault suite: every job accounted for", single, cols),
        ("cluster fault suite: every job accounted for, recovery", cluster, cols + extra),
    ):
        if not rows:
            continue
        terminalreporter.section(title)
        terminalreporter.write_line("| " + " | ".join(columns) + " |")
        terminalreporter.write_line("|" + "---|" * len(columns))
        for row in rows:
            terminalreporter.write_line("| " + " | ".join(str(row[c]) for c in columns) + " |")
    out = os.environ.get("LLMQ_FAULT_REPORT")
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=2) + "\n")
