"""The dead-letter tools' pure parts on letters nobody could decode and on decodable garbage.

The broker-level cases are in tests/integration/test_undecodable.py; here
``read_letter``, ``details``, ``replay_headers`` and the rendering get
inputs a producer can send: a marked letter (schemas/broker/frames.py), header
values of every odd type, markup and terminal escape codes, a body nested
deeper than orjson writes.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pamqp import encode

from producers.deadletters.actions import ReplayReport
from producers.deadletters.letters import details, read_letter, replay_headers
from producers.deadletters.render import console, letters_table, print_letter, print_replay
from schemas.broker.frames import MARKER, RAW, RAW_LENGTH


@dataclass
class Msg:
    body: bytes = b"{}"
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: dt.datetime | None = None


RAW_BLOCK = b"\x00\x80\x04ab\xff\xfe"


def marked(**extra: Any) -> dict[str, Any]:
    """The headers of a message whose properties could not be decoded."""
    return {
        MARKER: "message_id is not UTF-8: b'ab\\xff\\xfe'",
        RAW: base64.b64encode(RAW_BLOCK).decode(),
        RAW_LENGTH: len(RAW_BLOCK),
        **extra,
    }


def test_a_letter_marked_when_read_is_invalid_request_with_a_stable_handle() -> None:
    letter = read_letter(Msg(body=b'{"model": "m1"}', headers=marked()))
    assert letter.code == "invalid_request" and letter.undecodable is not None
    assert letter.error.startswith("AMQP properties could not be decoded: message_id")
    assert letter.job_id is not None and letter.job_id.startswith("undecodable-")
    assert letter.model == "m1"
    # The broker rewrites the properties on every requeue (x-delivery-count): same handle.
    again = read_letter(Msg(body=b'{"model": "m1"}', headers=marked(**{RAW: "AAAA"})))
    assert again.job_id == letter.job_id
    assert orjson.loads(orjson.dumps(letter.row(0)))["undecodable"] == letter.undecodable


def test_a_workers_dead_letter_of_an_undecodable_job_keeps_its_code() -> None:
    headers = marked(**{"error-code": "invalid_request", "error": "AMQP properties ..."})
    letter = read_letter(Msg(headers=headers, message_id="a-random-uuid-from-aiormq"))
    assert letter.source == "worker" and letter.code == "invalid_request"
    assert letter.job_id != "a-random-uuid-from-aiormq" and letter.undecodable is not None
    shown = details(Msg(headers=headers))
    assert shown["undecodable"]["raw_properties_hex"] == RAW_BLOCK.hex(" ")
    assert shown["undecodable"]["raw_properties_length"] == len(RAW_BLOCK)
    orjson.dumps(shown)


GARBAGE: dict[str, Any] = {
    "error-code": 42,
    "error": ["not", "text"],
    "failed-at": "99999999999999999999",
    "attempts": Decimal("-1E-255"),
    "model": b"\xff\xfe",
    "worker": {"nested": {"deeper": [dt.datetime(9999, 12, 31, tzinfo=dt.UTC)]}},
    "trace": {"nested": [None, True, -(2**63)]},
    "nested-blob": {"nested": [b"\xff"]},
    "sla-class": 3.5,
    "replay-count": -7,
    "published-ms": "99999999999999999999",  # digits past 64 bits
    "x-death": [{"reason": b"\xff", "time": "yesterday", "routing-keys": [None, 1]}, "odd"],
    "blob": b"\xff\xfe",
    "big": 1e300,
    "ok": bytearray(b"\x00\xff"),
}


def test_decodable_garbage_headers_read_without_raising() -> None:
    letter = read_letter(Msg(body=b"[" * 600 + b"]" * 600, headers=GARBAGE, message_id="g"))
    assert letter.job_id == "g" and letter.source == "broker"
    assert letter.code == "internal_error" and letter.undecodable is None
    orjson.dumps(letter.row(0))
    orjson.dumps(details(Msg(body=b"[" * 600 + b"]" * 600, headers=GARBAGE)))


def test_a_body_orjson_reads_but_cannot_write_is_shown_as_text() -> None:
    body = b"[" * 600 + b"]" * 600  # orjson reads 1,024 levels, writes 254
    shown = details(Msg(body=body))
    assert shown["body"] == body.decode()
    orjson.dumps(shown)


def test_replays_drop_header_values_the_client_cannot_write_again() -> None:
    out = replay_headers(GARBAGE, now_ms=1, sla_ms=None, default_sla_ms=30_000)
    assert {"blob", "big", "nested-blob"}.isdisjoint(out)
    assert out["ok"] == bytearray(b"\x00\xff") and "trace" in out
    encode.field_table(out)  # what aio-pika does on publish: must not raise


def _render(*objects: Any) -> str:
    out = console()
    with out.capture() as captured:
        for obj in objects:
            out.print(obj)
    return str(captured.get())


@pytest.mark.parametrize("text", ["[/x]", "[bold]ok[/]", "\x1b[2J\x1b[31mred", "a\nb\tc\x00"])
def test_what_a_dead_letter_says_is_printed_as_plain_text(text: str) -> None:
    headers = {"error-code": text, "error": text, "model": text, "worker": text}
    letter = read_letter(Msg(headers=headers, message_id=text))
    shown = _render(letters_table([letter], 0, "t"))
    assert "[/x]" in shown or "[bold]ok[/]" in shown or "\\x1b" in shown or "\\x00" in shown
    assert "\x1b" not in shown and "\x00" not in shown
    out = console()
    with out.capture() as captured:
        print_letter(out, letter.row(0), {**details(Msg(headers=headers)), "copies": 1})
        report = ReplayReport(replayed=1, matched=1, total=1, by_code={text: 1})
        print_replay(out, report, "llmq.jobs")
    assert "\x1b" not in captured.get()
