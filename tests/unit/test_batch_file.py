"""OpenAI batch files without a broker: input lines checked one by one, job ids,
output lines in OpenAI's format, and the output file read back for a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from producers.batch_console import EXIT_ERRORS, EXIT_INCOMPLETE, EXIT_OK, exit_status
from producers.batch_file import (
    BatchFileError,
    BatchLine,
    OutputFile,
    Tally,
    error_record,
    job_id_for,
    read_batch,
    reply_record,
)
from producers.openai_batch import BatchSummary, batch_key
from producers.submit_jobs import REASON_CODES, failure_record
from schemas.contract import JOB_ID_RE, JobKind
from schemas.errors import ErrorCode

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
EMBED = {"model": "e1", "input": "hello"}


def request(custom_id: Any, url: str = "/v1/chat/completions", **extra: Any) -> bytes:
    body = CHAT if url.endswith("completions") else EMBED
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra}
    return orjson.dumps(line)


def write(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_good_lines_become_jobs_of_their_kind(tmp_path: Path) -> None:
    """Chat and embeddings lines keep their body and custom_id; blank lines are skipped."""
    batch = read_batch(
        write(tmp_path / "in.jsonl", request("a"), b"", request("b", "/v1/embeddings"))
    )
    assert [(x.number, x.custom_id, x.kind, x.problem) for x in batch.lines] == [
        (1, "a", JobKind.CHAT, None),
        (3, "b", JobKind.EMBEDDING, None),
    ]
    assert batch.lines[1].body == EMBED


@pytest.mark.parametrize(
    ("raw", "custom_id", "problem"),
    [
        (b"not json", None, "not a JSON object"),
        (b"[1, 2]", None, "not a JSON object"),
        (request(""), None, "custom_id must be a non-empty string"),
        (request(7), None, "custom_id must be a non-empty string"),
        (request("x" * 513), None, "custom_id is longer than 512"),
        (request("a"), None, "custom_id repeats line 1"),
        (request("g", method="GET"), "g", "method must be POST"),
        (request("u", url="/v1/completions"), "u", "url must be one of"),
        (orjson.dumps({"custom_id": "b", "method": "POST", "url": "/v1/embeddings"}), "b", "body"),
        (request("m", body={"messages": []}), "m", "body has no model"),
    ],
)
def test_a_bad_line_is_kept_with_its_problem(
    tmp_path: Path, raw: bytes, custom_id: str | None, problem: str
) -> None:
    """One bad line does not stop the others; a custom_id it cannot own is dropped."""
    batch = read_batch(write(tmp_path / "in.jsonl", request("a"), raw, request("z")))
    first, bad, last = batch.lines
    assert first.problem is None and last.problem is None
    assert bad.custom_id == custom_id
    assert bad.problem is not None and bad.problem.startswith(problem)
    assert bad.key == (custom_id if custom_id is not None else 2)


def test_a_file_that_is_not_jsonl_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BatchFileError, match="not JSONL"):
        read_batch(write(tmp_path / "in.json", b"[", b'  {"custom_id": "a"},', b"]"))
    with pytest.raises(BatchFileError, match="no requests"):
        read_batch(write(tmp_path / "empty.jsonl", b""))


def test_job_ids_are_deterministic_valid_and_distinct() -> None:
    """Verbatim when the custom_id fits a job id, else a digest; the two forms never meet."""
    prefix = "oai.0123456789."
    ids = {c: job_id_for(prefix, c) for c in ("request-1", "a b", "é", "x" * 200)}
    assert ids["request-1"] == "oai.0123456789.request-1"
    assert all(JOB_ID_RE.match(i) for i in ids.values())
    assert job_id_for(prefix, "a b") == ids["a b"]
    digest_lookalike = ids["a b"].removeprefix(prefix)
    assert job_id_for(prefix, digest_lookalike) not in ids.values()
    assert len(set(ids.values())) == 4


LINE = BatchLine(3, "req-1", JobKind.CHAT, CHAT)


def test_an_ok_reply_is_a_200_response() -> None:
    reply = {"job_id": "j1", "status": "ok", "response": {"object": "chat.completion"}}
    record = reply_record(LINE, "j1", reply)
    assert record["custom_id"] == "req-1" and record["id"].startswith("batch_req_")
    assert record["response"] == {
        "status_code": 200,
        "request_id": "j1",
        "body": {"object": "chat.completion"},
    }
    assert record["error"] is None


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("unknown_model", 400, "invalid_request_error"),
        ("over_capacity", 429, "rate_limit_error"),
        ("upstream_error", 502, "server_error"),
        ("deadline_exceeded", 504, "server_error"),
    ],
)
def test_an_error_reply_is_its_http_status_with_an_openai_error_body(
    code: str, status: int, kind: str
) -> None:
    error = {"code": code, "message": "no", "retriable": False}
    record = reply_record(LINE, "j1", {"job_id": "j1", "status": "error", "error": error})
    assert record["response"]["status_code"] == status
    assert record["response"]["body"] == {
        "error": {"message": "no", "type": kind, "param": None, "code": code}
    }
    assert record["error"] is None


def test_a_line_without_a_reply_has_an_error_and_no_response() -> None:
    record = error_record(BatchLine(4, None, problem="x"), ErrorCode.INVALID_REQUEST, "line 4: x")
    assert record == {
        "id": "batch_req_line_4",
        "custom_id": None,
        "response": None,
        "error": {"code": "invalid_request", "message": "line 4: x"},
    }


def test_no_reply_and_not_sent_records_use_the_closed_set() -> None:
    """llmq submit --wait wrote backpressure/no_reply/...: now codes of ErrorCode, reason kept."""
    assert set(REASON_CODES) == {"no_reply", "backpressure", "publish_failed", "unroutable"}
    for reason, code in REASON_CODES.items():
        error = failure_record("j", reason, "m")["error"]
        assert error["code"] in ErrorCode._value2member_map_
        assert (error["code"], error["reason"]) == (code.value, reason)
    assert failure_record("j", "no_reply", "m")["error"]["code"] == "deadline_exceeded"
    assert failure_record("j", "backpressure", "m")["error"]["retriable"] is True


def _output(path: Path, batch_path: Path) -> OutputFile:
    return OutputFile(path, read_batch(batch_path))


def test_the_output_file_is_read_back_and_a_torn_last_line_dropped(tmp_path: Path) -> None:
    """Finished lines count as done; a line cut short by a crash is removed and redone."""
    batch = write(tmp_path / "in.jsonl", request("a"), b"junk", request("b"), request("c"))
    ok = reply_record(BatchLine(1, "a"), "j", {"status": "ok", "response": {}})
    bad = error_record(BatchLine(2, None), ErrorCode.INVALID_REQUEST, "x")
    torn = orjson.dumps(reply_record(BatchLine(3, "b"), "j", {"status": "ok", "response": {}}))
    out = tmp_path / "out.jsonl"
    out.write_bytes(orjson.dumps(ok) + b"\n" + orjson.dumps(bad) + b"\n" + torn[:20])
    output = _output(out, batch)
    assert output.done == {"a", 2}
    assert (output.before.ok, output.before.errors) == (1, {"invalid_request": 1})
    assert output.write("c", error_record(BatchLine(4, "c"), ErrorCode.DEADLINE_EXCEEDED, "m"))
    assert not output.write("a", ok)  # a line is written once
    output.close()
    keys = [orjson.loads(x)["custom_id"] for x in out.read_bytes().splitlines()]
    assert keys == ["a", None, "c"]


def test_another_batchs_output_is_refused_and_a_running_one_locked(tmp_path: Path) -> None:
    batch = write(tmp_path / "in.jsonl", request("a"))
    foreign = tmp_path / "foreign.jsonl"
    other = reply_record(BatchLine(1, "zzz"), "j", {"status": "ok", "response": {}})
    foreign.write_bytes(orjson.dumps(other) + b"\n")
    with pytest.raises(BatchFileError, match="'zzz' is not in this batch"):
        _output(foreign, batch)
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(BatchFileError, match="not a batch output line"):
        _output(text, batch)
    held = _output(tmp_path / "out.jsonl", batch)
    with pytest.raises(BatchFileError, match="another llmq submit"):
        _output(tmp_path / "out.jsonl", batch)
    held.close()


def test_exit_status_says_complete_with_errors_or_incomplete() -> None:
    done = Tally(ok=2)
    assert exit_status(BatchSummary(3, done, Tally(ok=1))) == EXIT_OK
    assert exit_status(BatchSummary(3, done, Tally(errors={"unknown_model": 1}))) == EXIT_ERRORS
    assert exit_status(BatchSummary(3, done, Tally())) == EXIT_INCOMPLETE


def test_a_batchs_reply_queue_is_not_guessable_from_its_prefix(tmp_path: Path) -> None:
    """The key names the reply queue: with --id-prefix it still depends on the input,
    and a rerun of the same input under the same prefix finds the same queue."""
    one = read_batch(write(tmp_path / "one.jsonl", request("a")))
    two = read_batch(write(tmp_path / "two.jsonl", request("b")))
    out = tmp_path / "out.jsonl"
    assert batch_key(one, out, "nightly.") != batch_key(two, out, "nightly.")
    assert batch_key(one, out, "nightly.") == batch_key(one, tmp_path / "x.jsonl", "nightly.")
