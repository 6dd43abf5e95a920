"""Decode jobs and encode replies: bytes and AMQP properties in, data out.

Pure: no broker, no clock (``now_ms`` is passed in). A delivery decodes to a
:class:`Job` or to a :class:`Rejected` that says which error code the job ends
with and keeps whatever ids could be read, so the worker can still answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.contract import (
    CONTENT_TYPE,
    HEADERS,
    JOB_ID_RE,
    SCHEMA_VERSION,
    ChatRequest,
    EmbeddingRequest,
    JobKind,
    SlaClass,
)
from schemas.errors import RETRIABLE, ErrorCode

__all__ = [
    "MAX_SLA_MS",
    "Delivery",
    "Job",
    "Rejected",
    "decode_job",
    "decode_reply",
    "encode_reply",
    "error_body",
]

MAX_SLA_MS = 7 * 24 * 3600 * 1000
"""The longest latency budget a job may ask for (a week); a worker may set less."""

CLOCK_SKEW_MS = 60_000
"""How far in the future a producer's clock may put a job's publish time."""

_TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_HEADER_STR = 256


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the codec needs of an AMQP delivery, as plain values."""

    body: bytes
    routing_key: str = SlaClass.INTERACTIVE.value
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    content_type: str | None = CONTENT_TYPE
    content_encoding: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    timestamp_ms: int | None = None
    """The AMQP ``timestamp`` property (whole seconds) in ms, if set."""
    user_id: str | None = None
    """The AMQP ``user_id`` property: RabbitMQ refuses a publish whose ``user_id``
    is not the publishing connection's user, so when set it is authenticated."""


@dataclass(frozen=True, slots=True)
class Job:
    """A decoded, valid job."""

    job_id: str
    correlation_id: str
    reply_to: str | None
    sla_class: str
    model: str
    """The model asked for (header ``model`` or the body's), before aliases."""
    body: dict[str, Any]
    """The request as received: unknown fields pass through to the upstream."""
    output_cap: int | None
    prompt_chars: int
    published_ms: int
    deadline_ms: int
    tenant: str | None = None
    """The ``tenant`` header as the producer wrote it: a claim, not an identity
    (the worker decides whom to believe, see ``schemas.tenancy``)."""
    traceparent: str | None = None
    replay_count: int = 0
    user_id: str | None = None
    """The authenticated broker user that published the job, if it said."""
    n: int = 1
    """Completions asked for (the body's ``n``): a cost multiplier."""
    body_bytes: int = 0
    """The body's size: a bound on the prompt tokens it can be billed for."""
    kind: JobKind = JobKind.CHAT
    """What the body asks for (the ``kind`` header): chat or embedding."""
    stream: bool = False
    """The body asks for a streamed answer (``stream: true``, chat only)."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A delivery that is not a valid job, and why."""

    code: ErrorCode
    message: str
    job_id: str | None
    correlation_id: str | None
    reply_to: str | None


def decode_job(
    delivery: Delivery,
    *,
    now_ms: int,
    default_sla_ms: Mapping[str, int],
    max_body_bytes: int,
    max_sla_ms: int = MAX_SLA_MS,
) -> Job | Rejected:
    """Validate a delivery and work out its deadline.

    The deadline is ``deadline-ms`` if present, else publish time + ``sla-ms``,
    else publish time + the SLA class default; never later than publish time +
    ``max_sla_ms``. Publish time is the ``published-ms`` header, else the
    ``timestamp`` property, else ``now_ms``, and never later than ``now_ms``:
    the producer's clock may claim a later time, and a later publish time would
    stretch the deadline past what the broker's consumer timeout allows. A
    publish time more than :data:`CLOCK_SKEW_MS` ahead is refused as forged or
    broken.
    """
    reply_to = _short_str(delivery.reply_to)
    job_id = delivery.message_id if _is_id(delivery.message_id) else None
    correlation_id = delivery.correlation_id if _is_id(delivery.correlation_id) else job_id

    def reject(code: ErrorCode, message: str) -> Rejected:
        return Rejected(code, message, job_id, correlation_id, reply_to)

    problem = _envelope_problem(delivery, reply_to, default_sla_ms, max_body_bytes)
    if problem is not None:
        return reject(*problem)
    assert job_id is not None  # _envelope_problem checked it
    try:
        h = _Headers.parse(delivery.headers)
    except ValueError as exc:
        return reject(ErrorCode.INVALID_REQUEST, str(exc))
    body = _read_body(delivery.body, h.kind)
    if isinstance(body, str):
        return reject(ErrorCode.INVALID_REQUEST, body)
    raw, request = body
    model = h.model or request.model
    if model is None:
        return reject(ErrorCode.INVALID_REQUEST, "no model: set the body's model or the header")
    n = raw.get("n", 1) if h.kind is JobKind.CHAT else 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
        return reject(ErrorCode.INVALID_REQUEST, "n must be an integer from 1 to 128")
    claimed = h.published_ms or delivery.timestamp_ms or now_ms
    if claimed > now_ms + CLOCK_SKEW_MS:
        return reject(
            ErrorCode.INVALID_REQUEST,
            f"published-ms is {claimed - now_ms} ms in the future (clock skew allowed:"
            f" {CLOCK_SKEW_MS} ms)",
        )
    published = min(claimed, now_ms)
    if h.deadline_ms is not None:
        deadline = h.deadline_ms
    else:
        deadline = published + (h.sla_ms or default_sla_ms[delivery.routing_key])
    deadline = min(deadline, published + max_sla_ms)

    return Job(
        job_id=job_id,
        correlation_id=correlation_id or job_id,
        reply_to=reply_to,
        sla_class=delivery.routing_key,
        model=model,
        body=raw,
        output_cap=request.output_cap() if isinstance(request, ChatRequest) else None,
        prompt_chars=(
            _prompt_chars(raw["messages"])
            if isinstance(request, ChatRequest)
            else request.input_chars()
        ),
        published_ms=published,
        deadline_ms=deadline,
        tenant=h.tenant,
        traceparent=h.traceparent,
        replay_count=h.replay_count,
        user_id=_short_str(delivery.user_id),
        n=n,
        body_bytes=len(delivery.body),
        kind=h.kind,
        stream=isinstance(request, ChatRequest) and request.stream is True,
    )


def _envelope_problem(
    delivery: Delivery,
    reply_to: str | None,
    default_sla_ms: Mapping[str, int],
    max_body_bytes: int,
) -> tuple[ErrorCode, str] | None:
    """What is wrong with the delivery's properties and size, before the body is read."""
    if delivery.message_id is None:
        return ErrorCode.INVALID_REQUEST, "message_id (the job id) is missing"
    if not _is_id(delivery.message_id):
        return ErrorCode.INVALID_REQUEST, "message_id is not a valid job id"
    if delivery.correlation_id is not None and not _is_id(delivery.correlation_id):
        return ErrorCode.INVALID_REQUEST, "correlation_id is not a valid id"
    if delivery.reply_to is not None and reply_to is None:
        return ErrorCode.INVALID_REQUEST, "reply_to is not a valid queue name"
    if len(delivery.body) > max_body_bytes:
        size = len(delivery.body)
        return ErrorCode.PAYLOAD_TOO_LARGE, f"body is {size} bytes, the limit is {max_body_bytes}"
    if delivery.content_type not in (None, "", CONTENT_TYPE):
        wrong = delivery.content_type[:64]
        return ErrorCode.INVALID_REQUEST, f"content_type must be {CONTENT_TYPE}, not {wrong!r}"
    if delivery.content_encoding not in (None, "", "identity", "utf-8"):
        return ErrorCode.INVALID_REQUEST, "content_encoding is not supported"
    if delivery.routing_key not in default_sla_ms:
        return ErrorCode.INVALID_REQUEST, f"unknown SLA class {delivery.routing_key[:64]!r}"
    return None


def _read_body(
    body: bytes, kind: JobKind
) -> tuple[dict[str, Any], ChatRequest | EmbeddingRequest] | str:
    """The body as JSON and as a request of its kind, or why it is not one."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "body is not valid UTF-8 JSON"
    if not isinstance(raw, dict):
        return "body must be a JSON object"
    try:
        # The body is forwarded as JSON again: orjson reads 1,024 levels of
        # nesting but writes only 255, so a body can parse and still be unsendable.
        orjson.dumps(raw)
    except orjson.JSONEncodeError as exc:
        return f"body cannot be forwarded: {exc}"
    try:
        request: ChatRequest | EmbeddingRequest = (
            ChatRequest.model_validate(raw)
            if kind is JobKind.CHAT
            else EmbeddingRequest.model_validate(raw)
        )
    except ValidationError as exc:
        return describe_validation_error(exc)
    return raw, request


@dataclass(frozen=True, slots=True)
class _Headers:
    model: str | None
    sla_ms: int | None
    deadline_ms: int | None
    published_ms: int | None
    tenant: str | None
    traceparent: str | None
    replay_count: int
    kind: JobKind

    @classmethod
    def parse(cls, headers: Mapping[str, Any]) -> _Headers:
        version = _int_header(headers, HEADERS.SCHEMA_VERSION, 1, 1_000)
        if version is not None and version > SCHEMA_VERSION:
            msg = f"schema-version {version} is newer than this worker's {SCHEMA_VERSION}"
            raise ValueError(msg)
        traceparent = headers.get(HEADERS.TRACEPARENT)
        if isinstance(traceparent, bytes):
            traceparent = traceparent.decode("ascii", "replace")
        # W3C: a malformed traceparent is dropped, never an error. fullmatch, not
        # match: ``$`` also matches before a trailing newline, which must not
        # reach an outgoing HTTP header. All-zero trace or parent ids are invalid.
        if not (
            isinstance(traceparent, str)
            and _TRACEPARENT_RE.fullmatch(traceparent)
            and traceparent[3:35] != "0" * 32
            and traceparent[36:52] != "0" * 16
        ):
            traceparent = None
        return cls(
            model=_str_header(headers, HEADERS.MODEL),
            sla_ms=_int_header(headers, HEADERS.SLA_MS, 1, MAX_SLA_MS),
            deadline_ms=_int_header(headers, HEADERS.DEADLINE_MS, 1, 2**53),
            published_ms=_int_header(headers, HEADERS.PUBLISHED_MS, 1, 2**53),
            tenant=_str_header(headers, HEADERS.TENANT),
            traceparent=traceparent,
            replay_count=_int_header(headers, HEADERS.REPLAY_COUNT, 0, 1_000_000) or 0,
            kind=_kind_header(headers),
        )


def _kind_header(headers: Mapping[str, Any]) -> JobKind:
    value = _str_header(headers, HEADERS.KIND)
    if value is None:
        return JobKind.CHAT
    if value not in JobKind._value2member_map_:
        known = ", ".join(k.value for k in JobKind)
        raise ValueError(f"header kind must be one of {known}, not {value[:64]!r}")
    return JobKind(value)


def _str_header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise ValueError(f"header {name} is not UTF-8") from None
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_HEADER_STR:
        raise ValueError(f"header {name} must be a string of 1 to {_MAX_HEADER_STR} characters")
    return value


def _int_header(headers: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, bytes | str) and len(value) <= 20:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if text.isascii() and text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"header {name} must be an integer")
    if not low <= value <= high:
        raise ValueError(f"header {name} must be between {low} and {high}, not {value}")
    return value


def _is_id(value: object) -> bool:
    # fullmatch: with match, ``$`` accepts a trailing newline ("job-1\n").
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def _short_str(value: str | None) -> str | None:
    if value is None or not 0 < len(value) <= 255 or not value.isprintable():
        return None
    return value


def _prompt_chars(messages: list[Any]) -> int:
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
    return total


def describe_validation_error(exc: ValidationError) -> str:
    """One line: the first problem, with the field's dotted path."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def error_body(code: ErrorCode, message: str) -> dict[str, Any]:
    """The ``error`` object of a reply."""
    return {"code": code.value, "message": message, "retriable": RETRIABLE[code]}


def encode_reply(
    job_id: str | None,
    *,
    response: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
) -> bytes:
    """Serialise a reply envelope (built as a dict: the hot path skips pydantic)."""
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "job_id": job_id,
            "status": "error" if error is not None else "ok",
            "response": response,
            "error": error,
            "routing": routing or {},
        }
    )


def decode_reply(body: bytes) -> dict[str, Any]:
    """Parse a reply envelope; raises ``ValueError`` when it is not one."""
    data = orjson.loads(body)
    if not isinstance(data, dict) or data.get("status") not in ("ok", "error"):
        raise ValueError("not an llmq reply envelope")
    return data
