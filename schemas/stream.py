"""The wire form of a streamed answer: ordered parts on the job's ``reply_to``.

A job whose body says ``"stream": true`` is answered with one or more
*parts*, each an AMQP message to ``reply_to`` under the job's
``correlation_id`` (docs/protocol.md, "Streamed replies")::

    {"schema_version": 1, "job_id": "...", "run": "9f2c...", "seq": 0,
     "chunks": [<chat.completion.chunk>, ...]}

The last part also carries ``"last": true`` and the outcome: ``status``
(``ok`` or ``error``), ``finish_reason``, ``usage`` and ``routing`` (as in a
reply), and ``error`` when the stream broke off (``stream_interrupted``).

- ``seq`` counts the parts of one ``run`` from 0, without gaps: the broker
  keeps their order, so a gap means a part was lost and the stream is broken.
- ``run`` names one serving of the job. A worker that dies mid-stream leaves
  the job to be delivered again, and the next worker starts a new ``run`` at
  ``seq`` 0: a consumer that has shown the old run's chunks cannot splice the
  two answers, so it ends the stream as ``stream_interrupted``; one that has
  shown nothing yet follows the new run.
- A job that fails before its first chunk is answered with an ordinary error
  reply (no ``seq``): the caller can still answer with a status code.

Pure: bytes and dicts, no broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.contract import SCHEMA_VERSION

__all__ = ["Part", "chunks_of_completion", "decode_part", "encode_part", "is_part"]


@dataclass(frozen=True, slots=True)
class Part:
    """One decoded part."""

    job_id: str | None
    run: str
    seq: int
    chunks: list[dict[str, Any]]
    last: bool = False
    status: str | None = None
    """``ok`` or ``error`` on the last part, else None."""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


def encode_part(
    job_id: str | None,
    run: str,
    seq: int,
    chunks: Sequence[dict[str, Any]],
    *,
    last: bool = False,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bytes:
    """Serialise one part; the outcome fields are written on the last part only."""
    part: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "job_id": job_id,
        "run": run,
        "seq": seq,
        "chunks": list(chunks),
    }
    if last:
        part["last"] = True
        part["status"] = "error" if error is not None else "ok"
        part["finish_reason"] = finish_reason
        part["usage"] = usage
        part["routing"] = routing or {}
        part["error"] = error
    return orjson.dumps(part)


def is_part(data: dict[str, Any]) -> bool:
    """Whether a decoded message on a reply queue is a stream part (not a reply)."""
    return "seq" in data and "run" in data


def decode_part(data: dict[str, Any]) -> Part:
    """A part from a decoded message; raises ``ValueError`` when it is not a valid one."""
    run, seq, chunks = data.get("run"), data.get("seq"), data.get("chunks")
    if not isinstance(run, str) or not run or len(run) > 64:
        raise ValueError("stream part: run must be a short string")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("stream part: seq must be an integer >= 0")
    if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
        raise ValueError("stream part: chunks must be a list of objects")
    last = data.get("last") is True
    status = data.get("status") if last else None
    if last and status not in ("ok", "error"):
        raise ValueError("stream part: the last part's status must be ok or error")
    job_id = data.get("job_id")
    return Part(
        job_id=job_id if isinstance(job_id, str) else None,
        run=run,
        seq=seq,
        chunks=chunks,
        last=last,
        status=status,
        finish_reason=_str_or_none(data.get("finish_reason")),
        usage=_dict_or_none(data.get("usage")),
        routing=_dict_or_none(data.get("routing")),
        error=_dict_or_none(data.get("error")),
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dict_or_none(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def chunks_of_completion(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A whole chat completion as the chunks a stream of it would carry: one
    for the choices (role, content, tool calls, finish reason), then one with
    the usage when the answer has one. For an endpoint that cannot stream."""
    common = {
        "id": body.get("id"),
        "object": "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    choices: list[dict[str, Any]] = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        delta = dict(message) if isinstance(message, dict) else {}
        calls = delta.get("tool_calls")
        if isinstance(calls, list):  # a stream's tool-call deltas are numbered
            delta["tool_calls"] = [
                {"index": i, **call} if isinstance(call, dict) and "index" not in call else call
                for i, call in enumerate(calls)
            ]
        reason = choice.get("finish_reason")
        choices.append({"index": choice.get("index", 0), "delta": delta, "finish_reason": reason})
    chunks = [{**common, "choices": choices}]
    usage = body.get("usage")
    if isinstance(usage, dict):
        chunks.append({**common, "choices": [], "usage": usage})
    return chunks
