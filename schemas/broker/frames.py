"""Safe AMQP frame reading: a message the client library cannot decode is marked, not fatal.

**The failure.** RabbitMQ checks the property block of a published message
for structure only. It accepts short strings (``message_id``, ``reply_to``,
header names...) that are not UTF-8, a ``timestamp`` past year 9999 and header
tables nested thousands deep. pamqp, which decodes frames for aiormq and
aio-pika, raises on each of them (``UnicodeDecodeError``, datetime's "year
out of range", ``RecursionError``), and aiormq's frame reader lets the
exception end the connection: every job in flight on it is requeued, and the same message comes
back on the next connection and ends that one too, until its delivery limit.
pamqp's table decoder is also quadratic in the number of fields: a 100 kB
array of void values takes ~0.4 s to decode, blocking the event loop.
Method frames carry producer bytes too: the routing key of a
``Basic.Deliver`` (a fanout or ``#`` binding routes keys that are not UTF-8)
and the text of a ``Channel.Close`` that echoes a bad ``user_id``.

**The fix.** Every llmq connection reads its socket through
``schemas.broker.connection.SafeFrameReader``, which hands each frame to
:class:`FrameGuard` before aiormq sees it. A content header whose property block
:func:`check_properties` does not pass is replaced by one with the same body
size (the body frames that follow stay in step) whose only property is a
marker header table: :data:`MARKER` (why), :data:`RAW` (the original
property bytes, base64, capped) and :data:`RAW_LENGTH`. The message arrives
whole; the worker dead-letters it as ``invalid_request`` and the ``llmq dlq``
tools show it (:func:`undecodable` recognises it). A watched method frame
whose short strings are not UTF-8 is rewritten with replacement characters,
and the content that follows such a delivery is marked as above.

**Why at this layer.** The exception happens inside aiormq's reader task,
before any consumer or callback of ours runs, so nothing above the frame
layer can catch it. aiormq takes a ``transport_factory`` per connection;
``SafeConnection`` and ``SafeRobustConnection`` (``schemas/broker/connection.py``)
pass one, so the guard applies to llmq's connections only, with no patch of
pamqp or aiormq.
The check is a strict, linear scan rather than a trial decode (which would
decode every message twice and inherit the quadratic cost); it is sound:
whatever it passes pamqp decodes and aio-pika accepts
(``tests/unit/test_frames.py`` checks that on random bytes).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

from pamqp.base import Frame
from pamqp.commands import Basic, Channel, Connection
from pamqp.header import ContentHeader

__all__ = [
    "MARKER",
    "MAX_DEPTH",
    "MAX_FIELDS",
    "RAW",
    "RAW_CAP",
    "RAW_LENGTH",
    "FrameGuard",
    "check_properties",
    "marked_header",
    "raw_properties",
    "undecodable",
]

MARKER = "x-llmq-undecodable"
"""Header of a marked message: why its properties could not be decoded."""
RAW = "x-llmq-raw-properties"
"""Header of a marked message: its original property bytes, base64, at most :data:`RAW_CAP`."""
RAW_LENGTH = "x-llmq-raw-properties-length"
"""Header of a marked message: the length of the original property block in bytes."""
RAW_CAP = 6_144
"""Raw property bytes kept (8 KiB as base64): far below any frame limit."""
MAX_DEPTH = 32
"""Nesting of header tables and arrays llmq reads; deeper is marked (pamqp recurses)."""
MAX_FIELDS = 1_000
"""Table entries and array items llmq reads in one property block (pamqp is quadratic)."""

_FRAME_METHOD, _FRAME_HEADER = 1, 2
_FRAME_END = 0xCE
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_HEAD = struct.Struct(">BHI")
# pamqp reads a timestamp above 2**32 - 1 as milliseconds; datetime ends with year 9999.
_MAX_TIMESTAMP = 253_402_300_799_000
_FIXED = {
    ord(t): n
    for t, n in zip("tbBsuIilLfdDV\0", (1, 1, 1, 2, 2, 4, 4, 8, 8, 4, 8, 5, 0, 0), strict=True)
}
_SIZED = frozenset(b"Sx")  # long string, byte array: a 32-bit length, then the bytes
_PROPERTIES = tuple(
    (name, Basic.Properties.flags[name], Basic.Properties.amqp_type(name))
    for name in Basic.Properties.__slots__
)
_SIZES = {"octet": 1, "short": 2, "long": 4, "longlong": 8}
if {kind for _, _, kind in _PROPERTIES} != {"shortstr", "table", "octet", "timestamp"}:
    raise ImportError("pamqp's Basic.Properties changed: review schemas/broker/frames.py")


class _Unreadable(Exception):
    """Why a property block is not read (internal to the scan)."""


def check_properties(block: bytes) -> str | None:
    """Why llmq cannot read this property block (flags onward), or None if it can.

    Strict where pamqp is lenient (trailing bytes, lengths past their table),
    which costs nothing: the broker refuses those itself.
    """
    try:
        _scan_properties(block)
    except _Unreadable as exc:
        return str(exc)
    return None


def _scan_properties(block: bytes) -> None:
    end = len(block)
    if end < 2:
        raise _Unreadable("the property flags are truncated")
    (flags,) = _U16.unpack_from(block)
    if flags & 1:
        raise _Unreadable("a second property flag word")
    pos, budget = 2, [MAX_FIELDS]
    for name, bit, kind in _PROPERTIES:
        if not flags & bit:
            continue
        if kind == "shortstr":
            stop = pos + 1 + (block[pos] if pos < end else end)
            if stop > end:
                raise _Unreadable(f"{name} is truncated")
            try:
                text = block[pos + 1 : stop].decode()
            except UnicodeDecodeError:
                raise _Unreadable(f"{name} is not UTF-8: {block[pos + 1 : stop][:40]!r}") from None
            if name == "expiration":
                _number(text)
            pos = stop
        elif kind == "octet":
            if pos >= end:
                raise _Unreadable(f"{name} is truncated")
            if name == "delivery_mode" and block[pos] > 2:
                raise _Unreadable(f"delivery_mode {block[pos]} is not 1 or 2")
            pos += 1
        elif kind == "timestamp":
            pos = _timestamp(block, pos, end, name)
        else:
            pos = _fields(block, pos, end, 1, budget, keyed=True)
    if pos != end:
        raise _Unreadable(f"{end - pos} bytes after the last property")


def _number(text: str) -> None:
    try:
        float(text)  # aio-pika reads expiration with float()
    except ValueError:
        raise _Unreadable(f"expiration {text[:40]!r} is not a number") from None


def _timestamp(data: bytes, pos: int, end: int, what: str) -> int:
    if pos + 8 > end:
        raise _Unreadable(f"{what} is truncated")
    (value,) = _U64.unpack_from(data, pos)
    if value > _MAX_TIMESTAMP:
        raise _Unreadable(f"{what} {value} is past year 9999")
    return pos + 8


def _fields(data: bytes, pos: int, end: int, depth: int, budget: list[int], *, keyed: bool) -> int:
    """Scan a field table (``keyed``) or field array at ``pos``; return where it ends."""
    what = "table" if keyed else "array"
    if depth > MAX_DEPTH:
        raise _Unreadable(f"headers nested deeper than {MAX_DEPTH} levels")
    if pos + 4 > end:
        raise _Unreadable(f"a header {what} is truncated")
    stop = pos + 4 + _U32.unpack_from(data, pos)[0]
    if stop > end:
        raise _Unreadable(f"a header {what} is longer than its frame")
    pos += 4
    while pos < stop:
        if keyed:
            key_end = pos + 1 + data[pos]
            if key_end >= stop:
                raise _Unreadable("a header table entry is truncated")
            try:
                data[pos + 1 : key_end].decode()
            except UnicodeDecodeError:
                key = data[pos + 1 : key_end][:40]
                raise _Unreadable(f"a header name is not UTF-8: {key!r}") from None
            pos = key_end
        budget[0] -= 1
        if budget[0] < 0:
            raise _Unreadable(f"more than {MAX_FIELDS} header fields")
        tag = data[pos]
        pos += 1
        size = _FIXED.get(tag)
        if size is not None:
            pos += size
        elif tag in _SIZED:
            pos += 4 + (_U32.unpack_from(data, pos)[0] if pos + 4 <= stop else stop)
        elif tag == 0x54:  # T
            pos = _timestamp(data, pos, stop, "a header timestamp")
        elif tag == 0x46 or tag == 0x41:  # F, A
            pos = _fields(data, pos, stop, depth + 1, budget, keyed=tag == 0x46)
        else:
            raise _Unreadable(f"unknown header field type {bytes([tag])!r}")
        if pos > stop:
            raise _Unreadable("a header value is truncated")
    return pos


def marked_header(payload: bytes, reason: str) -> bytes:
    """A content header payload with ``payload``'s body size and only the marker headers."""
    body_size = struct.unpack_from(">Q", payload, 4)[0]
    raw = payload[12:]
    headers: dict[str, Any] = {
        MARKER: reason[:200],
        RAW: base64.b64encode(raw[:RAW_CAP]).decode("ascii"),
        RAW_LENGTH: len(raw),
    }
    return ContentHeader(
        body_size=body_size, properties=Basic.Properties(headers=headers)
    ).marshal()


def undecodable(headers: Mapping[str, Any] | None) -> str | None:
    """Why a message's properties could not be decoded, if it is a marked message."""
    reason = (headers or {}).get(MARKER)
    return reason if isinstance(reason, str) else None


def raw_properties(headers: Mapping[str, Any] | None) -> bytes | None:
    """The original property bytes a marked message (or its dead letter) kept."""
    value = (headers or {}).get(RAW)
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


def _layout(method: type[Frame]) -> tuple[int, ...]:
    """Where a method's short strings are: -1 for one, n > 0 for n bytes of something else."""
    steps: list[int] = []
    bits = False
    for name in method.__slots__:
        kind = method.amqp_type(name)
        if kind != "bit":
            steps.append(-1 if kind == "shortstr" else _SIZES[kind])
        elif not bits:
            steps.append(1)  # consecutive bits share an octet
        bits = kind == "bit"
    return tuple(steps)


_WATCHED = {
    m.index: _layout(m)
    for m in (Basic.Deliver, Basic.GetOk, Basic.Return, Channel.Close, Connection.Close)
}
_CONTENT_FOLLOWS = frozenset((Basic.Deliver.index, Basic.GetOk.index, Basic.Return.index))


def _repair_method(payload: bytes, layout: tuple[int, ...]) -> tuple[bytes, str] | None:
    """``payload`` with its short strings made UTF-8, and why, or None if they are."""
    pos = 4
    for step in layout:
        if step > 0:
            pos += step
            continue
        stop = pos + 1 + payload[pos]
        try:
            payload[pos + 1 : stop].decode()
        except UnicodeDecodeError:
            break
        pos = stop
    else:
        return None
    out, pos, problem = [payload[:4]], 4, ""
    for step in layout:
        if step > 0:
            out.append(payload[pos : pos + step])
            pos += step
            continue
        stop = pos + 1 + payload[pos]
        raw = payload[pos + 1 : stop]
        try:
            raw.decode()
        except UnicodeDecodeError:
            problem = problem or f"a short string is not UTF-8: {raw[:40]!r}"
            # Replacement characters, cut to 255 bytes without splitting one.
            raw = raw.decode("utf-8", "replace").encode()[:255].decode("utf-8", "ignore").encode()
        out.append(bytes([len(raw)]) + raw)
        pos = stop
    return b"".join(out) + payload[pos:], problem


class FrameGuard:
    """Sans-I/O: takes whole frames as read, returns what aiormq may safely decode."""

    def __init__(self) -> None:
        self._tainted: dict[int, str] = {}  # channel → why its next content is marked

    def frame(self, data: bytes) -> bytes:
        """``data`` (one frame, header to end byte) or its safe replacement."""
        kind, channel, size = _HEAD.unpack_from(data)
        if len(data) != size + 8 or data[-1] != _FRAME_END or size < 4:
            return data  # not a frame we can judge: aiormq reports it as before
        payload = data[7:-1]
        if kind == _FRAME_HEADER:
            taint = self._tainted.pop(channel, None)
            if size < 12:
                return data  # no body size: nothing to keep in step (never from a broker)
            reason = taint or check_properties(payload[12:])
            if reason is None:
                return data
            new = marked_header(payload, reason)
        elif kind == _FRAME_METHOD and (layout := _WATCHED.get(_U32.unpack_from(payload)[0])):
            try:
                repaired = _repair_method(payload, layout)
            except IndexError:
                return data  # truncated: the broker never sends one
            if repaired is None:
                return data
            new, reason = repaired
            if _U32.unpack_from(payload)[0] in _CONTENT_FOLLOWS:
                self._tainted[channel] = reason
        else:
            return data
        return _HEAD.pack(kind, channel, len(new)) + new + bytes([_FRAME_END])
