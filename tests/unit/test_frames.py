"""Safe frame reading (schemas/broker/frames.py, connection.py) on hand-built frame bytes.

Every hostile property block here is one RabbitMQ 3.10 accepts (measured
with tests/rawamqp.py); pamqp raises on each, which is what ended the
consuming connection. The guard must turn each into a marked header that
pamqp decodes, leave every readable frame byte for byte as it was, and pass
nothing pamqp or aio-pika cannot take (checked on random bytes).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import struct
import time
from typing import Any

import pytest
from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from aiormq.connection import FrameReceiver
from aiormq.exceptions import InvalidFrameError, ProtocolSyntaxError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import body, commands, frame, header
from pamqp.exceptions import PAMQPException
from rawamqp import entry, longstr, nested_table, properties, shortstr, table, timestamp
from yarl import URL

from schemas.broker.connection import (
    SafeConnection,
    SafeFrameReader,
    SafeRobustConnection,
    SafeTransportFactory,
)
from schemas.broker.frames import (
    MARKER,
    MAX_DEPTH,
    MAX_FIELDS,
    RAW,
    RAW_CAP,
    RAW_LENGTH,
    FrameGuard,
    check_properties,
    raw_properties,
    undecodable,
)

BAD = b"ab\xff\xfe"


def header_frame(block: bytes, *, body_size: int = 7, channel: int = 1) -> bytes:
    """A content-header frame around a raw property block."""
    payload = struct.pack(">HHQ", 60, 0, body_size) + block
    return struct.pack(">BHI", 2, channel, len(payload)) + payload + b"\xce"


def deliver_frame(routing_key: bytes = b"interactive", *, channel: int = 1) -> bytes:
    method = (
        struct.pack(">HH", 60, 60)
        + shortstr(b"ctag1.abc")
        + struct.pack(">QB", 42, 0)
        + shortstr(b"llmq.jobs")
        + shortstr(routing_key)
    )
    return struct.pack(">BHI", 1, channel, len(method)) + method + b"\xce"


def nested_array(depth: int) -> bytes:
    inner = struct.pack(">I", 0)
    for _ in range(depth - 1):
        inner = struct.pack(">I", len(inner) + 1) + b"A" + inner
    return inner


# Each accepted by RabbitMQ 3.10.8; each makes pamqp raise.
HOSTILE = {
    "message_id not UTF-8": properties(message_id=shortstr(BAD)),
    "reply_to not UTF-8": properties(reply_to=shortstr(b"llmq.reply." + BAD)),
    "content_type not UTF-8": properties(content_type=shortstr(BAD)),
    "correlation_id not UTF-8": properties(correlation_id=shortstr(BAD)),
    "type not UTF-8": properties(type=shortstr(BAD)),
    "app_id not UTF-8": properties(app_id=shortstr(BAD)),
    "cluster_id not UTF-8": properties(cluster_id=shortstr(BAD)),
    "header name not UTF-8": properties(headers=table(entry(b"k" + BAD, b"S", longstr(b"v")))),
    "nested header name not UTF-8": properties(
        headers=table(entry(b"t", b"F", table(entry(BAD, b"V", b""))))
    ),
    "timestamp 2**63-1": properties(timestamp=timestamp(2**63 - 1)),
    "timestamp 2**64-1": properties(timestamp=timestamp(2**64 - 1)),
    "timestamp year 10000 in ms": properties(timestamp=timestamp(253_402_300_800_000)),
    "header timestamp 2**63-1": properties(headers=table(entry(b"t", b"T", timestamp(2**63 - 1)))),
    "tables nested 5000 deep": properties(headers=nested_table(5000)),
    "arrays nested 3000 deep": properties(headers=table(entry(b"a", b"A", nested_array(3000)))),
}


@pytest.mark.parametrize("block", HOSTILE.values(), ids=HOSTILE.keys())
def test_guard_marks_each_hostile_block_keeping_body_size_and_raw_bytes(block: bytes) -> None:
    original = header_frame(block, body_size=1234, channel=3)
    # The failure being fixed: pamqp raises (and not only ValueError) ...
    with pytest.raises((PAMQPException, OverflowError, RecursionError)):
        frame.unmarshal(original)
    # ... and on what the guard hands over it cannot.
    guarded = FrameGuard().frame(original)
    _, channel, decoded = frame.unmarshal(guarded)
    assert channel == 3 and isinstance(decoded, header.ContentHeader)
    assert decoded.body_size == 1234
    headers = decoded.properties.headers
    assert set(headers) == {MARKER, RAW, RAW_LENGTH}
    assert undecodable(headers) == check_properties(block) is not None
    assert raw_properties(headers) == block[:RAW_CAP]
    assert headers[RAW_LENGTH] == len(block)
    # Nothing else survives: no reply_to, message_id... that could not be read.
    props = decoded.properties
    assert props.reply_to is None and props.message_id is None and props.timestamp is None


def test_reasons_name_what_could_not_be_read() -> None:
    assert "message_id is not UTF-8" in str(check_properties(HOSTILE["message_id not UTF-8"]))
    assert "header name" in str(check_properties(HOSTILE["header name not UTF-8"]))
    assert "past year 9999" in str(check_properties(HOSTILE["timestamp 2**63-1"]))
    assert "nested deeper" in str(check_properties(HOSTILE["tables nested 5000 deep"]))


def test_raw_bytes_are_capped() -> None:
    big = properties(
        message_id=shortstr(BAD), headers=table(entry(b"k", b"S", longstr(b"x" * 9000)))
    )
    headers = frame.unmarshal(FrameGuard().frame(header_frame(big)))[2].properties.headers
    assert raw_properties(headers) == big[:RAW_CAP]
    assert len(headers[RAW]) <= 8192 and headers[RAW_LENGTH] == len(big)


READABLE = {
    "none": properties(),
    "llmq job": commands.Basic.Properties(
        content_type="application/json",
        headers={"tenant": "t1", "deadline-ms": 123, "x": [1, "a", {"b": None}]},
        delivery_mode=2,
        priority=0,
        correlation_id="c" * 32,
        reply_to="llmq.reply.abc",
        message_id="m" * 32,
        timestamp=datetime.datetime(2026, 1, 1),
    ).marshal(),
    "every field type": properties(
        headers=table(
            *(
                entry(tag.encode(), tag.encode(), value)
                for tag, value in {
                    "t": b"\x01",
                    "b": b"\x80",
                    "B": b"\xff",
                    "s": b"\xff\xff",
                    "u": b"\xff\xff",
                    "I": b"\xff" * 4,
                    "i": b"\xff" * 4,
                    "l": b"\xff" * 8,
                    "L": b"\xff" * 8,
                    "f": b"\x7f\x7f\xff\xff",
                    "d": struct.pack(">d", 1e300),
                    "D": b"\xff" + b"\xff" * 4,
                    "S": longstr(BAD),  # pamqp hands these over as bytes
                    "x": longstr(BAD),
                    "T": timestamp(253_402_300_799_000),
                    "V": b"",
                    "F": table(),
                    "A": struct.pack(">I", 0),
                }.items()
            )
        )
    ),
    "nested to the limit": properties(headers=nested_table(MAX_DEPTH)),
    "fields to the limit": properties(
        headers=table(*(entry(b"k%d" % i, b"V", b"") for i in range(MAX_FIELDS)))
    ),
    "the reserved flag bit": struct.pack(">H", 0x0002),
    "unicode": properties(message_id=shortstr("é✓".encode()), app_id=shortstr(b"")),
}


@pytest.mark.parametrize("block", READABLE.values(), ids=READABLE.keys())
def test_readable_frames_pass_unchanged(block: bytes) -> None:
    raw = header_frame(block)
    assert check_properties(block) is None
    assert FrameGuard().frame(raw) is raw
    frame.unmarshal(raw)


def test_costly_header_tables_are_marked_quickly() -> None:
    """pamqp decodes 100,000 void array items in ~0.4 s (quadratic): llmq does not ask it."""
    voids = struct.pack(">I", 100_000) + b"V" * 100_000
    block = properties(headers=table(entry(b"a", b"A", voids)))
    started = time.perf_counter()
    guarded = FrameGuard().frame(header_frame(block))
    assert time.perf_counter() - started < 0.1
    headers = frame.unmarshal(guarded)[2].properties.headers
    assert f"more than {MAX_FIELDS} header fields" in headers[MARKER]
    deeper = properties(headers=nested_table(MAX_DEPTH + 1))
    assert "nested deeper" in str(check_properties(deeper))


def test_delivery_with_a_routing_key_not_utf8_is_repaired_and_its_content_marked() -> None:
    guard = FrameGuard()
    bad = deliver_frame(b"interactive" + BAD, channel=2)
    with pytest.raises(PAMQPException, match="utf-8"):
        frame.unmarshal(bad)
    method = frame.unmarshal(guard.frame(bad))[2]
    assert isinstance(method, commands.Basic.Deliver)
    assert method.routing_key == "interactive" + "ab\ufffd\ufffd"
    assert method.delivery_tag == 42 and method.exchange == "llmq.jobs"
    good = header_frame(READABLE["llmq job"], channel=1)
    assert guard.frame(good) is good  # another channel: untouched
    marked = frame.unmarshal(guard.frame(header_frame(READABLE["llmq job"], channel=2)))[2]
    assert "not UTF-8" in marked.properties.headers[MARKER]
    assert raw_properties(marked.properties.headers) == READABLE["llmq job"]
    assert guard.frame(good) is good and guard.frame(header_frame(READABLE["none"], channel=2))


def test_readable_deliveries_pass_unchanged() -> None:
    raw = deliver_frame()
    assert FrameGuard().frame(raw) is raw


def test_close_whose_text_echoes_bytes_not_utf8_is_repaired() -> None:
    """The broker's PRECONDITION_FAILED for a bad user_id quotes it."""
    text = b"PRECONDITION_FAILED - user_id property set to '" + BAD + b"'"
    method = struct.pack(">HHH", 20, 40, 406) + shortstr(text) + struct.pack(">HH", 60, 40)
    raw = struct.pack(">BHI", 1, 1, len(method)) + method + b"\xce"
    with pytest.raises(PAMQPException, match="utf-8"):
        frame.unmarshal(raw)
    close = frame.unmarshal(FrameGuard().frame(raw))[2]
    assert isinstance(close, commands.Channel.Close)
    assert close.reply_code == 406 and close.reply_text.startswith("PRECONDITION_FAILED")
    assert (close.class_id, close.method_id) == (60, 40)


def test_long_replacement_is_cut_to_a_short_string() -> None:
    raw = deliver_frame(b"\xff" * 255)
    method = frame.unmarshal(FrameGuard().frame(raw))[2]
    assert len(method.routing_key.encode()) <= 255 and set(method.routing_key) == {"\ufffd"}


# ---- the guard against pamqp and aio-pika on random input -----------------


def _can_deliver(raw: bytes) -> None:
    """pamqp decodes the frame and aio-pika builds an incoming message from it."""
    _, _, content = frame.unmarshal(raw)
    assert isinstance(content, header.ContentHeader)
    delivery = commands.Basic.Deliver(consumer_tag="c", delivery_tag=1, routing_key="k")
    message = DeliveredMessage(delivery=delivery, header=content, body=b"", channel=None)
    IncomingMessage(message, no_ack=True)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_property_bytes_come_out_decodable(block: bytes) -> None:
    guarded = FrameGuard().frame(header_frame(block))
    _can_deliver(guarded)
    if check_properties(block) is None:
        assert guarded == header_frame(block)


_SIZES = {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "l": 8, "L": 8, "f": 4}
_SIZES |= {"d": 8, "D": 5, "V": 0, "\0": 0}
_text = st.text(max_size=20).map(str.encode).filter(lambda b: len(b) < 256)
# Mostly UTF-8, sometimes any bytes (one_of would pick each half the time).
_strings = st.integers(0, 9).flatmap(lambda n: st.binary(max_size=12) if n == 0 else _text)
_scalars = st.one_of(
    st.sampled_from(sorted(_SIZES)).flatmap(
        lambda t: st.tuples(st.just(t), st.binary(min_size=_SIZES[t], max_size=_SIZES[t]))
    ),
    st.tuples(st.sampled_from(list("Sx")), _strings.map(longstr)),
    st.tuples(st.just("T"), st.integers(0, 2**64 - 1).map(timestamp)),
    # Wrong sizes and tags nobody knows: the broker refuses these, the guard must too.
    st.tuples(st.sampled_from(list("tsIlDSZzQ?")), st.binary(max_size=3)),
)


def _array(items: list[tuple[str, bytes]]) -> bytes:
    data = b"".join(tag.encode() + value for tag, value in items)
    return struct.pack(">I", len(data)) + data


def _field(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    tables = st.lists(st.tuples(_strings, children), max_size=4).map(
        lambda items: ("F", table(*(entry(k, v[0].encode(), v[1]) for k, v in items)))
    )
    arrays = st.lists(children, max_size=4).map(lambda items: ("A", _array(items)))
    return st.one_of(tables, arrays)


_values = st.recursive(_scalars, _field, max_leaves=20)
_tables = st.lists(st.tuples(_strings, _values), max_size=5).map(
    lambda items: table(*(entry(k, v[0].encode(), v[1]) for k, v in items))
)
_blocks = st.fixed_dictionaries(
    {},
    optional={
        "content_type": _strings.map(shortstr),
        "headers": _tables,
        "delivery_mode": st.sampled_from(b"\x01\x02\x01\x02\x00\x03\xff").map(lambda n: bytes([n])),
        "priority": st.integers(0, 255).map(lambda n: bytes([n])),
        "correlation_id": _strings.map(shortstr),
        "reply_to": _strings.map(shortstr),
        "expiration": st.sampled_from([b"1000", b"60000", b"nan", b"x", b"1e3", BAD]).map(shortstr),
        "message_id": _strings.map(shortstr),
        "timestamp": st.integers(0, 2**64 - 1).map(timestamp),
        "type": _strings.map(shortstr),
        "user_id": _strings.map(shortstr),
        "app_id": _strings.map(shortstr),
    },
).map(lambda fields: properties(**fields))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(_blocks, st.sampled_from([b"", b"", b"", b"\x00"]))
def test_structured_property_blocks_come_out_decodable(block: bytes, tail: bytes) -> None:
    """Whatever the guard passes, pamqp decodes and aio-pika accepts; the rest is marked."""
    block += tail
    raw = header_frame(block)
    guarded = FrameGuard().frame(raw)
    _can_deliver(guarded)
    if check_properties(block) is None:
        assert guarded is raw
    else:
        assert undecodable(frame.unmarshal(guarded)[2].properties.headers)


# ---- the reader under aiormq's frame receiver ----------------------------


def _stream() -> list[bytes]:
    """Frames as a broker sends them: deliveries, good and bad, bodies, a heartbeat."""
    good = READABLE["llmq job"]
    frames = []
    for block in (good, HOSTILE["timestamp 2**63-1"], good, HOSTILE["tables nested 5000 deep"]):
        frames += [deliver_frame(), header_frame(block, body_size=5)]
        frames.append(frame.marshal(body.ContentBody(b"hello"), 1))
    frames.append(b"\x08\x00\x00\x00\x00\x00\x00\xce")  # heartbeat
    frames += [deliver_frame(b"k" + BAD), header_frame(good, body_size=0)]
    return frames


async def _receive(reader: Any, n: int) -> list[Any]:
    receiver = FrameReceiver(reader)
    return [(await receiver.get_frame())[2] for _ in range(n)]


def _fed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_aiormq_frame_receiver_reads_every_frame_through_the_guard() -> None:
    frames = _stream()
    with pytest.raises(InvalidFrameError, match="year 292278994 is out of range"):
        await _receive(_fed(b"".join(frames)), len(frames))  # what ended the connection
    got = await _receive(SafeFrameReader(_fed(b"".join(frames))), len(frames))
    headers = [f for f in got if isinstance(f, header.ContentHeader)]
    assert [undecodable(h.properties.headers) is not None for h in headers] == [
        False,
        True,
        False,
        True,
        True,  # the one after a delivery whose routing key is not UTF-8
    ]
    assert [f.value for f in got if isinstance(f, body.ContentBody)] == [b"hello"] * 4
    assert headers[0].properties.reply_to == "llmq.reply.abc"


@settings(max_examples=50)
@given(st.lists(st.integers(1, 400), min_size=1, max_size=60))
async def test_reads_of_any_size_see_the_guarded_bytes(sizes: list[int]) -> None:
    frames = _stream()
    guard = FrameGuard()
    expected = b"".join(guard.frame(f) if f[0] in (1, 2) else f for f in frames)
    reader = SafeFrameReader(_fed(b"".join(frames)))
    out = b""
    for size in sizes:
        if len(out) + size > len(expected):
            break
        out += await reader.readexactly(size)
    assert out == expected[: len(out)]


async def test_a_protocol_header_back_is_reported_as_before() -> None:
    reader = SafeFrameReader(_fed(b"AMQP\x00\x00\x09\x01"))
    with pytest.raises(ProtocolSyntaxError):
        await FrameReceiver(reader).get_frame()


async def test_llmq_connection_classes_open_their_socket_through_the_guard() -> None:
    for cls in (SafeConnection, SafeRobustConnection):
        connection = cls(URL("amqp://guest:guest@127.0.0.1/"))
        assert isinstance(connection.kwargs["transport_factory"], SafeTransportFactory)


def test_marker_helpers_ignore_ordinary_headers() -> None:
    assert undecodable(None) is None and undecodable({"x": 1}) is None
    assert undecodable({MARKER: b"bytes"}) is None
    assert raw_properties({RAW: "not base64!"}) is None
    assert raw_properties({RAW: base64.b64encode(b"\xff").decode()}) == b"\xff"
