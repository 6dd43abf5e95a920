"""OpenAI Batch API files: the lines ``llmq submit --openai-batch`` reads and writes.

An input line is one request, ``{"custom_id", "method": "POST", "url", "body"}``
with ``url`` ``/v1/chat/completions`` or ``/v1/embeddings``. An output line is
OpenAI's ``BatchRequestOutput``::

    {"id": "batch_req_…", "custom_id": "…",
     "response": {"status_code": 200, "request_id": "<job id>", "body": {…}} | null,
     "error": {"code": "…", "message": "…"} | null}

A job a worker answered has a ``response``: 200 and the OpenAI response, or
the reply's error code's HTTP status with an OpenAI error body (as the
gateway answers it). A line that never became a job, or whose job got no
reply in time, has ``response: null`` and an ``error`` with a code of the
closed set (:class:`schemas.errors.ErrorCode`), as OpenAI does for non-HTTP
errors.

The output file is also the run's memory: a rerun reads it back
(:class:`OutputFile`), skips every line already in it, cuts a last line a
crash left half-written, and appends the rest. No broker here.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from producers.gateway_core import answer_for_reply
from schemas.contract import JOB_ID_RE, JobKind
from schemas.errors import ErrorCode

__all__ = [
    "MAX_CUSTOM_ID",
    "URLS",
    "BatchFileError",
    "BatchLine",
    "OutputFile",
    "error_record",
    "job_id_for",
    "read_batch",
    "reply_record",
]

URLS: dict[str, JobKind] = {
    "/v1/chat/completions": JobKind.CHAT,
    "/v1/embeddings": JobKind.EMBEDDING,
}
"""The batch ``url`` values llmq runs, and the job kind each becomes."""

MAX_CUSTOM_ID = 512
"""Longer custom ids are refused: each job carries its custom id in a header."""

_HASHED = "sha256="
"""Job ids of custom ids that do not fit a job id: PREFIX + this + a digest. A
custom id that itself starts with it is hashed too, so the two forms never meet."""

Key = str | int
"""What names a line in both files: its custom id, or its line number when it has
no usable one (missing, not a string, repeated)."""


class BatchFileError(Exception):
    """The input or output file cannot be used at all; ``str()`` is ready to print."""


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One input line: a request to run, or the reason it is not one."""

    number: int
    custom_id: str | None
    kind: JobKind | None = None
    body: dict[str, Any] | None = None
    problem: str | None = None
    """Why the line is not a job (it becomes an ``invalid_request`` output line)."""

    @property
    def key(self) -> Key:
        return self.custom_id if self.custom_id is not None else self.number


@dataclass(slots=True)
class BatchInput:
    lines: list[BatchLine]
    digest: str
    """sha256 of the file's bytes: part of the default job id prefix."""

    @property
    def custom_ids(self) -> set[str]:
        return {line.custom_id for line in self.lines if line.custom_id is not None}


def read_batch(path: Path) -> BatchInput:
    """Every non-blank line of an OpenAI batch input file, checked.

    A bad line is kept with its ``problem`` (it gets an error line in the
    output); only a file in which no line is a JSON object at all is refused.
    """
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    digest = hashlib.sha256()
    objects = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                digest.update(raw)
                if not raw.strip():
                    continue
                line = _read_line(number, raw, seen)
                objects += line.problem != _NOT_AN_OBJECT
                lines.append(line)
    except OSError as exc:
        raise BatchFileError(f"{path}: {exc.strerror or exc}") from None
    if not lines:
        raise BatchFileError(f"{path}: no requests in the file")
    if objects == 0:
        raise BatchFileError(f"{path}: not JSONL (no line is a JSON object)")
    return BatchInput(lines, digest.hexdigest())


_NOT_AN_OBJECT = "not a JSON object"


def _read_line(number: int, raw: bytes, seen: dict[str, int]) -> BatchLine:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BatchLine(number, None, problem=_NOT_AN_OBJECT)
    if not isinstance(data, dict):
        return BatchLine(number, None, problem=_NOT_AN_OBJECT)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(number, None, problem="custom_id must be a non-empty string")
    if len(custom_id) > MAX_CUSTOM_ID:
        return BatchLine(number, None, problem=f"custom_id is longer than {MAX_CUSTOM_ID}")
    if custom_id in seen:
        return BatchLine(number, None, problem=f"custom_id repeats line {seen[custom_id]}")
    seen[custom_id] = number
    problem = _request_problem(data)
    if problem is not None:
        return BatchLine(number, custom_id, problem=problem)
    return BatchLine(number, custom_id, URLS[data["url"]], data["body"])


def _request_problem(data: Mapping[str, Any]) -> str | None:
    if data.get("method") != "POST":
        return "method must be POST"
    if data.get("url") not in URLS:
        return f"url must be one of {', '.join(URLS)}, not {str(data.get('url'))[:100]!r}"
    body = data.get("body")
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "body has no model"
    return None


def job_id_for(prefix: str, custom_id: str) -> str:
    """The job id of a custom id: PREFIX + the custom id when that is a valid
    job id, else PREFIX + ``sha256=`` + a digest of it. Deterministic, so a rerun
    sends an unanswered job again under the same id."""
    verbatim = prefix + custom_id
    if JOB_ID_RE.match(verbatim) and not custom_id.startswith(_HASHED):
        return verbatim
    return prefix + _HASHED + hashlib.sha256(custom_id.encode()).hexdigest()[:32]


def _record_id(line: BatchLine) -> str:
    if line.custom_id is None:
        return f"batch_req_line_{line.number}"
    return "batch_req_" + hashlib.sha256(line.custom_id.encode()).hexdigest()[:24]


def reply_record(line: BatchLine, job_id: str, reply: Mapping[str, Any]) -> dict[str, Any]:
    """The output line of a job a worker answered (ok or error)."""
    answer = answer_for_reply(reply, job_id)
    return {
        "id": _record_id(line),
        "custom_id": line.custom_id,
        "response": {"status_code": answer.status, "request_id": job_id, "body": answer.body},
        "error": None,
    }


def error_record(line: BatchLine, code: ErrorCode, message: str) -> dict[str, Any]:
    """The output line of a line that got no reply: never a job, or none came in time."""
    return {
        "id": _record_id(line),
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": code.value, "message": message},
    }


def record_code(record: Mapping[str, Any]) -> str | None:
    """The error code of an output line, None for a 200."""
    error = record.get("error")
    if isinstance(error, dict):
        return str(error.get("code"))
    response = record.get("response") or {}
    if response.get("status_code") == 200:
        return None
    body_error = (response.get("body") or {}).get("error") or {}
    return str(body_error.get("code") or ErrorCode.INTERNAL_ERROR.value)


@dataclass(slots=True)
class Tally:
    """Output lines by outcome."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, record: Mapping[str, Any]) -> None:
        code = record_code(record)
        if code is None:
            self.ok += 1
        else:
            self.errors[code] = self.errors.get(code, 0) + 1

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())


class OutputFile:
    """The output file, appended to once per line; what it held already is done.

    Locked while open (``flock``): two runs appending to one file would
    interleave their lines.
    """

    def __init__(self, path: Path, batch: BatchInput) -> None:
        self.path = path
        self.done: set[Key] = set()
        self.before = Tally()
        """The lines the file held when opened."""
        self.now = Tally()
        """The lines this run wrote."""
        self._file: IO[bytes] = self._open(batch)

    def _open(self, batch: BatchInput) -> IO[bytes]:
        try:
            f = self.path.open("a+b")
        except OSError as exc:
            raise BatchFileError(f"{self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise BatchFileError(f"{self.path}: another llmq submit is writing it") from None
        try:
            self._read_back(f, batch.custom_ids)
        except BatchFileError:
            f.close()
            raise
        return f

    def _read_back(self, f: IO[bytes], custom_ids: set[str]) -> None:
        f.seek(0)
        offset = 0
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                # A crash cut the last line short: drop it; its request runs again.
                f.truncate(offset)
                break
            offset += len(raw)
            if not raw.strip():
                continue
            record = _output_record(raw)
            key = None if record is None else _output_key(record)
            if key is None or (isinstance(key, str) and key not in custom_ids):
                what = "not a batch output line" if key is None else f"custom_id {key!r} is"
                raise BatchFileError(
                    f"{self.path}, line {number}: {what} not in this batch's input;"
                    " use another --output"
                )
            if record is not None and key not in self.done:
                self.done.add(key)
                self.before.add(record)
        f.seek(0, 2)

    def write(self, key: Key, record: Mapping[str, Any]) -> bool:
        """Append ``record`` for ``key`` unless the file has one; flushed before return."""
        if key in self.done:
            return False
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()
        self.done.add(key)
        self.now.add(record)
        return True

    def close(self) -> None:
        self._file.close()


def _output_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "id" in record else None


def _output_key(record: Mapping[str, Any]) -> Key | None:
    custom_id = record.get("custom_id")
    if isinstance(custom_id, str):
        return custom_id
    record_id = str(record["id"])
    if record_id.startswith("batch_req_line_") and record_id[15:].isdigit():
        return int(record_id[15:])
    return None
