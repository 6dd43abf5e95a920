"""Reading a JSONL file of jobs for ``llmq submit``: checked whole before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers.submit import SubmitError, SubmitSummary, read_jobs

LINE = '{"model": "m1", "messages": [{"role": "user", "content": "hi"}]}'


def test_jobs_keep_their_line_numbers_and_get_the_defaults(tmp_path: Path) -> None:
    """Blank lines are skipped; defaults fill what a line leaves out, never override it."""
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        f'{LINE}\n\n{{"messages": [{{"role": "user", "content": "x"}}], "max_tokens": 5}}\n'
    )
    count, jobs = read_jobs(path, {"model": "dflt", "max_tokens": 9})
    assert count == 2
    assert [(n, j["model"], j["max_tokens"]) for n, j in jobs()] == [(1, "m1", 9), (3, "dflt", 5)]


def test_bad_lines_are_all_reported_and_nothing_is_sent(tmp_path: Path) -> None:
    """Each bad line is named; the command stops before publishing."""
    path = tmp_path / "jobs.jsonl"
    path.write_text(f'{LINE}\nnot json\n[1]\n{{"model": "m1"}}\n{{"messages": [{{}}]}}\n{LINE}\n')
    with pytest.raises(SubmitError) as info:
        read_jobs(path, {})
    text = str(info.value)
    for expected in (
        "line 2: not JSON",
        "line 3: not a JSON object",
        "line 4: messages",
        "line 5: no model",
    ):
        assert expected in text
    assert "nothing was sent" in text


def test_an_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n\n")
    with pytest.raises(SubmitError, match="no jobs"):
        read_jobs(path, {})


def test_summary_percentiles() -> None:
    summary = SubmitSummary(latencies_ms=[float(i) for i in range(1, 101)])
    assert summary.percentile(0.5) == 51.0 and summary.percentile(0.99) == 99.0
    assert SubmitSummary().percentile(0.5) is None
    assert SubmitSummary(total=3, ok=2, errors={"unknown_model": 1}).as_dict()["errors"] == {
        "unknown_model": 1
    }
