"""What ``llmq submit`` sends and what it reports: jobs, failure records, the summary.

A job that got no reply from a worker ends with a record whose ``error.code``
is one of the closed set (:class:`schemas.errors.ErrorCode`) and whose
``error.reason`` says what happened (:data:`REASON_CODES`). The engine that
sends the jobs is :mod:`producers.submit`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from producers.quantiles import nearest_rank
from schemas.contract import SCHEMA_VERSION
from schemas.errors import RETRIABLE, ErrorCode

if TYPE_CHECKING:
    from producers.client import LlmqClient

__all__ = [
    "NOT_SENT",
    "REASON_CODES",
    "Ask",
    "OutboundJob",
    "SubmitError",
    "SubmitSummary",
    "failure_record",
    "read_jobs",
]

_MAX_BAD_LINES = 5

REASON_CODES: dict[str, ErrorCode] = {
    # Submitted, but no reply within the SLA plus a grace: the deadline passed.
    "no_reply": ErrorCode.DEADLINE_EXCEEDED,
    # The work queue stayed full (broker nacks): llmq could not take the job now.
    "backpressure": ErrorCode.OVER_CAPACITY,
    # The broker did not confirm (unreachable for the client's republish window):
    # the job may or may not be queued; resending it under its id is safe.
    "publish_failed": ErrorCode.OVER_CAPACITY,
    # No queue is bound for the class: a deployment problem, as the gateway says too.
    "unroutable": ErrorCode.INTERNAL_ERROR,
}
"""Why a job got no reply from a worker, and the code of the closed set it ends with."""

NOT_SENT = frozenset({"backpressure", "publish_failed", "unroutable"})
"""The reasons that mean the broker did not take the job."""


class SubmitError(Exception):
    """The jobs could not be sent; ``str()`` is ready to print."""


@dataclass(slots=True)
class SubmitSummary:
    """What happened to the jobs of one ``llmq submit``."""

    total: int = 0
    submitted: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Jobs sent that did not end ok, by code: error replies, and
    ``deadline_exceeded`` for a job that got no reply in time."""
    not_submitted: dict[str, int] = field(default_factory=dict)
    """Jobs the broker did not take, by code (:data:`REASON_CODES`)."""
    backpressure: int = 0
    """Broker nacks (queue full) that made us wait and resend."""
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def percentile(self, q: float) -> float | None:
        return nearest_rank(self.latencies_ms, q)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "submitted": self.submitted,
            "ok": self.ok,
            "errors": dict(self.errors),
            "not_submitted": dict(self.not_submitted),
            "backpressure": self.backpressure,
            "p50_ms": self.percentile(0.5),
            "p99_ms": self.percentile(0.99),
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass(frozen=True, slots=True)
class OutboundJob:
    """One job to send: the line it came from, its id, its body, its own options."""

    line: int
    job_id: str
    body: Mapping[str, Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``LlmqClient.submit`` keywords for this job (``correlation_id``, ``headers``)."""


Ask = Callable[["LlmqClient", OutboundJob, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Send one job and return its reply envelope; raise ``DeadlineExceeded`` when none came."""


def read_jobs(
    path: Path, defaults: dict[str, Any]
) -> tuple[int, Callable[[], Iterator[tuple[int, dict[str, Any]]]]]:
    """Check a JSONL file of OpenAI requests; return its job count and a reader.

    The whole file is checked before anything is sent, so a typo on line
    9 000 does not leave 8 999 jobs sent and the rest not. ``defaults`` fill
    fields a line leaves out (``model``, ``max_tokens``, ``temperature``).
    Blank lines are skipped; job ids keep the file's line numbers.
    """
    count, bad = 0, []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                _parse_line(number, raw, defaults)
                count += 1
            except ValueError as exc:
                bad.append(str(exc))
                if len(bad) >= _MAX_BAD_LINES:
                    break
    if bad:
        raise SubmitError(f"{path}: " + "; ".join(bad) + " — nothing was sent")
    if count == 0:
        raise SubmitError(f"{path}: no jobs in the file")

    def jobs() -> Iterator[tuple[int, dict[str, Any]]]:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield number, _parse_line(number, raw, defaults)

    return count, jobs


def _parse_line(number: int, raw: bytes, defaults: dict[str, Any]) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"line {number}: not a JSON object")
    for key, value in defaults.items():
        data.setdefault(key, value)
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise ValueError(f"line {number}: no model (add one, or give --model)")
    if not isinstance(data.get("messages"), list) or not data["messages"]:
        raise ValueError(f"line {number}: messages must be a non-empty list")
    return data


def failure_record(job_id: str, reason: str, message: str) -> dict[str, Any]:
    """A reply-shaped record for a job that got no reply from a worker.

    ``error.code`` is the reason's code of the closed set; ``error.reason``
    keeps what happened (a key of :data:`REASON_CODES`).
    """
    code = REASON_CODES[reason]
    return {
        "schema_version": SCHEMA_VERSION,
        "job_id": job_id,
        "status": "error",
        "response": None,
        "error": {
            "code": code.value,
            "message": message,
            "retriable": RETRIABLE[code],
            "reason": reason,
        },
        "routing": {},
    }
