"""Dead letters as data: what a message in ``llmq.dead`` says, pure.

A dead letter has one of two shapes (docs/protocol.md, section 9): written by
a worker, with the ``error-*`` headers, or written by the broker, with only
``x-death``. Either may be a message whose AMQP properties could not be
decoded (``schemas/broker/frames.py``): such a letter keeps the raw property bytes,
cannot be replayed and has no job id of its own (it gets ``undecodable-<hash>``).
:func:`read_letter` turns each into one :class:`DeadLetter`;
:class:`Filter` selects them; :func:`replay_headers` computes the headers of
a replay. No I/O and no clock here: ``now_ms`` is always passed in.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Any, Literal, Protocol

import orjson
from pamqp import encode

from schemas.broker.frames import RAW_LENGTH, raw_properties, undecodable
from schemas.contract import DEAD_HEADERS, HEADERS, SlaClass
from schemas.errors import ErrorCode
from schemas.secrets import redact_headers

__all__ = [
    "REMOVED_ON_REPLAY",
    "DeadLetter",
    "Filter",
    "MessageLike",
    "details",
    "format_age",
    "jsonable",
    "parse_duration",
    "read_letter",
    "replay_class",
    "replay_headers",
    "split_body",
]

REMOVED_ON_REPLAY = frozenset(
    {
        DEAD_HEADERS.ERROR_CODE,
        DEAD_HEADERS.ERROR,
        DEAD_HEADERS.ATTEMPTS,
        DEAD_HEADERS.FAILED_AT,
        DEAD_HEADERS.WORKER,
        DEAD_HEADERS.SLA_CLASS,
        DEAD_HEADERS.REPLY,
        DEAD_HEADERS.REPLY_ERROR,
        DEAD_HEADERS.REPLY_OFFSET,
        DEAD_HEADERS.HEADERS_DROPPED,
        HEADERS.DEADLINE_MS,
        "user-id",  # producers.deadletters.copies.USER_ID_HEADER
    }
)
"""Headers a replay drops, besides every ``x-*`` header (those are the broker's).

``sla-class`` goes too: the replay's routing key carries it, and a worker
writes it again if the job fails again; so does ``user-id``, where a browse
keeps a ``user_id`` it may not publish (a replay sends the operator's)."""

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class MessageLike(Protocol):
    """The parts of an AMQP message a dead letter is read from (aio-pika's fit)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any] | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def timestamp(self) -> dt.datetime | None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message of the dead-letter queue, read."""

    job_id: str | None
    code: str
    """The ``error-code``; for a broker dead letter ``internal_error`` (``deadline_exceeded``
    when the broker expired it)."""
    error: str
    source: Literal["worker", "broker"]
    model: str | None
    attempts: int | None
    failed_at_ms: int | None
    """When it failed: ``failed-at``, else ``x-death[0].time``, else the publish time."""
    worker: str | None
    sla_class: str | None
    """``sla-class``, else ``x-death[0].routing-keys[0]``."""
    replay_count: int
    headers: Mapping[str, Any] = field(repr=False)
    undecodable: str | None = None
    """Why its AMQP properties could not be decoded (then it cannot be replayed)."""

    def age_s(self, now_ms: int) -> float | None:
        """Seconds since it failed, or None when nothing says when."""
        if self.failed_at_ms is None:
            return None
        return max(0.0, (now_ms - self.failed_at_ms) / 1000)

    def row(self, now_ms: int) -> dict[str, Any]:
        """The summary ``llmq dlq list --json`` prints."""
        return {
            "job_id": self.job_id,
            "model": self.model,
            "code": self.code,
            "error": self.error,
            "source": self.source,
            "attempts": self.attempts,
            "age_s": None if (age := self.age_s(now_ms)) is None else round(age, 1),
            "failed_at_ms": self.failed_at_ms,
            "worker": self.worker,
            "sla_class": self.sla_class,
            "replay_count": self.replay_count,
            "undecodable": self.undecodable,
        }


def read_letter(message: MessageLike) -> DeadLetter:
    """Read a message of the dead-letter queue, whichever shape it has."""
    headers: Mapping[str, Any] = message.headers or {}
    death = _first_death(headers)
    unreadable = undecodable(headers)
    code = _text(headers.get(DEAD_HEADERS.ERROR_CODE))
    if code is not None:
        source: Literal["worker", "broker"] = "worker"
        error = _text(headers.get(DEAD_HEADERS.ERROR)) or ""
        failed_at = _int(headers.get(DEAD_HEADERS.FAILED_AT))
    elif unreadable is not None:
        # Its own properties cannot be decoded (the broker dead-lettered it, or
        # it was published here): what it says is in the raw bytes only.
        source = "broker"
        code = ErrorCode.INVALID_REQUEST.value
        error = f"AMQP properties could not be decoded: {unreadable}"
        failed_at = None
    else:
        source = "broker"
        reason = _text(death.get("reason")) or "unknown"
        # The contract: a broker dead letter is internal_error (delivery_limit). An
        # expired one (the producer set `expiration`) ran out of time in the queue.
        code = (
            ErrorCode.DEADLINE_EXCEEDED if reason == "expired" else ErrorCode.INTERNAL_ERROR
        ).value
        error = _broker_error(reason, death) if death else "no error-code and no x-death header"
        failed_at = _time_ms(death.get("time"))
    if failed_at is None:
        failed_at = _int(headers.get(HEADERS.PUBLISHED_MS)) or _time_ms(message.timestamp)
    job_id = message.message_id
    if unreadable is not None:
        # The job's own id was in the bytes nobody could decode (a worker's dead
        # letter of it has the client library's random one): a stable handle instead,
        # from what a requeue leaves alone (the broker rewrites the properties then).
        seed = unreadable.encode() + b"\0" + message.body
        job_id = "undecodable-" + hashlib.sha256(seed).hexdigest()[:12]
    return DeadLetter(
        job_id=job_id,
        code=code,
        error=error,
        source=source,
        model=_text(headers.get(HEADERS.MODEL)) or _body_model(message.body),
        attempts=_int(headers.get(DEAD_HEADERS.ATTEMPTS)),
        failed_at_ms=failed_at,
        worker=_text(headers.get(DEAD_HEADERS.WORKER)),
        sla_class=_text(headers.get(DEAD_HEADERS.SLA_CLASS)) or _first_key(death),
        replay_count=_int(headers.get(HEADERS.REPLAY_COUNT)) or 0,
        headers=headers,
        undecodable=unreadable,
    )


def _broker_error(reason: str, death: Mapping[str, Any]) -> str:
    where = _text(death.get("queue")) or "?"
    count = _int(death.get("count"))
    times = f", {count}x" if count and count > 1 else ""
    return f"dead-lettered by the broker: {reason} in {where}{times}"


def _first_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]  # newest first
    return {}


def _first_key(death: Mapping[str, Any]) -> str | None:
    keys = death.get("routing-keys")
    if isinstance(keys, list | tuple) and keys:
        return _text(keys[0])
    return None


def _body_model(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and model else None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    """An integer header as the contract allows it: an integer or ASCII digits."""
    if isinstance(value, bytes | str) and 0 < len(value) <= 20:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        value = int(text) if text.isascii() and text.isdigit() else None
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    # Twenty digits can pass 64 bits, which neither AMQP nor orjson can write.
    return value if -(2**63) <= value < 2**63 else None


def _time_ms(value: Any) -> int | None:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # AMQP timestamps are UTC
            value = value.replace(tzinfo=dt.UTC)
        return int(value.timestamp() * 1000)
    return None


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters a command acts on; empty means all."""

    codes: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    older_than_s: float | None = None
    limit: int | None = None
    """At most this many matches, in queue order (applied by the caller)."""

    def matches(self, letter: DeadLetter, now_ms: int) -> bool:
        if self.codes and letter.code not in self.codes:
            return False
        if self.models and letter.model not in self.models:
            return False
        if self.older_than_s is not None:
            age = letter.age_s(now_ms)
            if age is None or age < self.older_than_s:
                return False
        return True

    def describe(self) -> str:
        parts = [f"code={c}" for c in sorted(self.codes)]
        parts += [f"model={m}" for m in sorted(self.models)]
        if self.older_than_s is not None:
            parts.append(f"older than {format_age(self.older_than_s)}")
        if self.limit is not None:
            parts.append(f"at most {self.limit}")
        return ", ".join(parts) or "all"


def replay_class(letter: DeadLetter, classes: Mapping[str, Any]) -> str:
    """The routing key of a replay: the original class if it is still configured."""
    for candidate in (
        _text(letter.headers.get(DEAD_HEADERS.SLA_CLASS)),
        _first_key(_first_death(letter.headers)),
    ):
        if candidate is not None and candidate in classes:
            return candidate
    return SlaClass.INTERACTIVE.value


def replay_headers(
    headers: Mapping[str, Any], *, now_ms: int, sla_ms: int | None, default_sla_ms: int
) -> dict[str, Any]:
    """The headers of a replay: error and broker headers gone, a fresh deadline.

    ``sla-ms`` is ``sla_ms`` when given, else the original one when valid, else
    ``default_sla_ms``; ``published-ms`` is now; ``replay-count`` goes up by one.
    """
    out = {
        k: v
        for k, v in headers.items()
        if k not in REMOVED_ON_REPLAY and not k.lower().startswith("x-") and _encodable(v)
    }
    original = _int(headers.get(HEADERS.SLA_MS))
    out[HEADERS.SLA_MS] = sla_ms or (original if original and original > 0 else default_sla_ms)
    out[HEADERS.PUBLISHED_MS] = now_ms
    out[HEADERS.REPLAY_COUNT] = (_int(headers.get(HEADERS.REPLAY_COUNT)) or 0) + 1
    return out


def _encodable(value: Any) -> bool:
    """Whether the client library can write this header value again.

    It reads some it cannot write (a long string that is not UTF-8 comes back
    as bytes; a double is written back as a float, which 1e300 overflows): a
    replay drops those rather than fail on them.
    """
    try:
        encode.encode_table_value(value)
    except (TypeError, ValueError, OverflowError, RecursionError, struct.error):
        return False
    return True


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``1d`` (also ``ms``, ``w``, decimals) as seconds."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 2h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def format_age(seconds: float | None) -> str:
    """A short age: ``42s``, ``12m``, ``3h 5m``, ``2d 4h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def jsonable(value: Any) -> Any:
    """AMQP field values as JSON: datetimes as ISO 8601, bytes as text (or base64)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    return value


def details(message: MessageLike) -> dict[str, Any]:
    """Everything about one dead letter, JSON-able, with credential-like headers redacted."""
    props = {
        name: jsonable(getattr(message, name, None))
        for name in (
            "message_id",
            "correlation_id",
            "reply_to",
            "content_type",
            "content_encoding",
            "delivery_mode",
            "priority",
            "timestamp",
            "expiration",
            "type",
            "app_id",
            "user_id",
        )
    }
    headers = redact_headers(message.headers or {})
    reply = headers.pop("reply", None)
    body, tail = split_body(message.body, message.headers or {})
    if tail is not None:
        reply = tail
    return {
        "undecodable": _undecodable_details(message.headers or {}),
        "properties": props,
        "headers": jsonable(headers),
        "reply": _json_or_text(reply) if isinstance(reply, bytes | str) else jsonable(reply),
        "body": _json_or_text(body),
    }


def split_body(body: bytes, headers: Mapping[str, Any]) -> tuple[bytes, bytes | None]:
    """The job's body and, when a large undelivered reply follows it
    (``reply-offset``), that reply; a bad offset leaves the body whole."""
    offset = headers.get(DEAD_HEADERS.REPLY_OFFSET)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= len(body):
        return body, None
    return body[:offset], body[offset:]


_HEX_SHOWN = 1_024


def _undecodable_details(headers: Mapping[str, Any]) -> dict[str, Any] | None:
    """Why a letter's properties could not be decoded, and their raw bytes as hex."""
    reason = undecodable(headers)
    if reason is None:
        return None
    raw = raw_properties(headers) or b""
    length = _int(headers.get(RAW_LENGTH))
    return {
        "reason": reason,
        "raw_properties_length": length,
        "raw_properties_kept": len(raw),
        "raw_properties_hex": raw[:_HEX_SHOWN].hex(" ") + (" …" if len(raw) > _HEX_SHOWN else ""),
    }


def _json_or_text(raw: bytes | str) -> Any:
    try:
        data = orjson.loads(raw)
        orjson.dumps(data)  # orjson reads 1,024 levels deep but writes only 254
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return jsonable(raw)
    return data
