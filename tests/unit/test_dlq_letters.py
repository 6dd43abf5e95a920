"""Reading dead letters, filtering them and computing replay headers: no broker."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from producers.deadletters.letters import (
    Filter,
    details,
    format_age,
    jsonable,
    parse_duration,
    read_letter,
    replay_class,
    replay_headers,
)
from schemas.secrets import redact_headers

NOW = 1_750_000_000_000
CLASSES = {"interactive": object(), "batch": object()}


@dataclass
class Msg:
    headers: Mapping[str, Any] | None = field(default_factory=dict)
    body: bytes = b'{"model": "body-model", "messages": [{"role": "user", "content": "hi"}]}'
    message_id: str | None = "job-1"
    correlation_id: str | None = "job-1"
    reply_to: str | None = "llmq.reply.svc"
    timestamp: dt.datetime | None = None


def worker_letter(**headers: Any) -> Msg:
    base = {
        "error-code": "upstream_error",
        "error": "a: HTTP 503 on 3 attempts",
        "attempts": 3,
        "failed-at": NOW - 90_000,
        "worker": "host:1",
        "sla-class": "batch",
    }
    return Msg(headers={**base, **headers})


def broker_letter(reason: str = "delivery_limit", **extra: Any) -> Msg:
    death = {
        "reason": reason,
        "queue": "llmq.q.batch",
        "exchange": "llmq.jobs",
        "routing-keys": ["batch"],
        "count": 1,
        "time": dt.datetime.fromtimestamp((NOW - 3_600_000) / 1000, tz=dt.UTC),
    }
    return Msg(headers={"x-death": [death], "x-first-death-reason": reason, **extra})


def test_worker_dead_letter_is_read_from_its_error_headers() -> None:
    """Code, error, attempts, age, worker and class come from the worker's headers."""
    letter = read_letter(worker_letter())
    assert (letter.code, letter.source, letter.attempts, letter.worker) == (
        "upstream_error",
        "worker",
        3,
        "host:1",
    )
    assert letter.error == "a: HTTP 503 on 3 attempts" and letter.sla_class == "batch"
    assert letter.age_s(NOW) == 90.0 and letter.replay_count == 0
    assert letter.model == "body-model"  # no model header: the body's


def test_model_header_wins_over_the_body() -> None:
    """The ``model`` header is what the job was routed on."""
    assert read_letter(worker_letter(model="header-model")).model == "header-model"
    assert (
        read_letter(Msg(headers={"error-code": "invalid_request"}, body=b"not json")).model is None
    )


def test_broker_dead_letter_is_internal_error_with_the_x_death_reason() -> None:
    """No error-code: ``internal_error``, reason and class from x-death[0]."""
    letter = read_letter(broker_letter())
    assert (letter.code, letter.source, letter.sla_class) == ("internal_error", "broker", "batch")
    assert "delivery_limit" in letter.error and "llmq.q.batch" in letter.error
    assert letter.age_s(NOW) == 3600.0 and letter.attempts is None and letter.worker is None


def test_expired_broker_dead_letter_is_deadline_exceeded() -> None:
    """A message the broker expired in the queue ran out of time."""
    assert read_letter(broker_letter("expired")).code == "deadline_exceeded"


def test_letter_without_any_error_header_still_reads() -> None:
    """Published straight to the dead-letter exchange: internal_error, age from publish time."""
    letter = read_letter(Msg(headers={"published-ms": NOW - 5000}))
    assert letter.code == "internal_error" and "no error-code" in letter.error
    assert letter.age_s(NOW) == 5.0
    ts = dt.datetime.fromtimestamp((NOW - 7000) / 1000, tz=dt.UTC)
    assert read_letter(Msg(headers=None, timestamp=ts)).age_s(NOW) == 7.0


@pytest.mark.parametrize("value", [3, "3", b"3"])
def test_integer_headers_may_be_digit_strings(value: object) -> None:
    """The contract allows ASCII digits for integer headers."""
    assert read_letter(worker_letter(attempts=value, **{"replay-count": value})).attempts == 3


def test_filter_by_code_model_age_and_any_combination() -> None:
    """Empty filter matches all; each criterion narrows; unknown age never matches older-than."""
    letter = read_letter(worker_letter(model="m1"))
    assert Filter().matches(letter, NOW)
    assert Filter(codes=frozenset({"upstream_error", "x"})).matches(letter, NOW)
    assert not Filter(codes=frozenset({"unknown_model"})).matches(letter, NOW)
    assert Filter(models=frozenset({"m1"})).matches(letter, NOW)
    assert not Filter(models=frozenset({"m2"})).matches(letter, NOW)
    assert Filter(older_than_s=60).matches(letter, NOW)
    assert not Filter(older_than_s=120).matches(letter, NOW)
    assert not Filter(older_than_s=1).matches(read_letter(Msg(headers={})), NOW)
    assert Filter(frozenset({"upstream_error"}), frozenset({"m1"}), 10, 5).describe() == (
        "code=upstream_error, model=m1, older than 10s, at most 5"
    )
    assert Filter().describe() == "all"


def test_replay_goes_to_the_original_class() -> None:
    """``sla-class``, else x-death's routing key, else interactive; only configured classes."""
    assert replay_class(read_letter(worker_letter()), CLASSES) == "batch"
    assert replay_class(read_letter(broker_letter()), CLASSES) == "batch"
    assert replay_class(read_letter(Msg()), CLASSES) == "interactive"
    assert replay_class(read_letter(worker_letter(**{"sla-class": "gone"})), CLASSES) == (
        "interactive"
    )


def test_replay_headers_drop_errors_and_broker_headers_and_renew_the_deadline() -> None:
    """Error and x- headers go, deadline-ms goes, published-ms is now, replay-count + 1."""
    headers = {
        **worker_letter().headers,  # type: ignore[dict-item]
        "reply": b"{}",
        "reply-error": "reply_to queue does not exist",
        "x-death": [{}],
        "x-delivery-count": 2,
        "deadline-ms": NOW - 1,
        "sla-ms": 20_000,
        "published-ms": NOW - 99_999,
        "replay-count": 2,
        "tenant": "billing",
        "model": "m1",
    }
    out = replay_headers(headers, now_ms=NOW, sla_ms=None, default_sla_ms=30_000)
    assert out == {
        "tenant": "billing",
        "model": "m1",
        "sla-ms": 20_000,
        "published-ms": NOW,
        "replay-count": 3,
    }


def test_replay_sla_is_the_override_else_the_original_else_the_class_default() -> None:
    """``--sla-ms`` wins; a missing or bad original falls back to the class default."""
    assert replay_headers({"sla-ms": 5}, now_ms=NOW, sla_ms=9, default_sla_ms=7)["sla-ms"] == 9
    assert replay_headers({"sla-ms": "5"}, now_ms=NOW, sla_ms=None, default_sla_ms=7)["sla-ms"] == 5
    assert replay_headers({}, now_ms=NOW, sla_ms=None, default_sla_ms=7)["sla-ms"] == 7
    assert replay_headers({"sla-ms": 0}, now_ms=NOW, sla_ms=None, default_sla_ms=7)["sla-ms"] == 7
    bad = {"sla-ms": 1.5, "replay-count": "x"}
    out = replay_headers(bad, now_ms=NOW, sla_ms=None, default_sla_ms=7)
    assert out["sla-ms"] == 7 and out["replay-count"] == 1


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5h", 5400), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "m", "-1m", "1y", "ten minutes"])
def test_bad_durations_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match="like 30s, 10m"):
        parse_duration(text)


def test_ages_are_short() -> None:
    assert [format_age(s) for s in (None, 5, 600, 7500, 200_000)] == [
        "-",
        "5s",
        "10m",
        "2h 5m",
        "2d 7h",
    ]


def test_credential_like_headers_are_redacted_at_any_depth() -> None:
    """Authorization, API keys, tokens, cookies: never printed."""
    headers = {
        "Authorization": "Bearer sk-1",
        "x-api-key": "sk-2",
        "nested": {"access_token": "t", "ok": 1},
        "list": [{"password": "p"}, "plain"],
        "tenant": "billing",
    }
    assert redact_headers(headers) == {
        "Authorization": "[redacted]",
        "x-api-key": "[redacted]",
        "nested": {"access_token": "[redacted]", "ok": 1},
        "list": [{"password": "[redacted]"}, "plain"],
        "tenant": "billing",
    }


def test_details_are_json_ready() -> None:
    """Datetimes, bytes and the stored reply become JSON; the body is parsed when it is JSON."""
    ts = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    msg = worker_letter(reply=b'{"status": "error"}', authorization="Bearer sk-x")
    msg.timestamp = ts
    out = details(msg)
    orjson.dumps(out)  # serialisable
    assert out["properties"]["timestamp"] == "2025-01-01T00:00:00+00:00"
    assert out["properties"]["reply_to"] == "llmq.reply.svc"
    assert out["reply"] == {"status": "error"} and "reply" not in out["headers"]
    assert out["headers"]["authorization"] == "[redacted]"
    assert out["body"]["model"] == "body-model"
    assert details(Msg(body=b"\xff\xfe"))["body"] == {"base64": "//4="}
    assert jsonable(b"text") == "text"
