"""Property tests: whatever arrives from the broker, decode_job answers and never raises."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from schemas import (
    DEAD_HEADERS,
    HEADERS,
    RETRIABLE,
    Delivery,
    ErrorCode,
    Job,
    Rejected,
    Reply,
    decode_job,
    decode_reply,
    encode_reply,
)
from schemas.codec import error_body
from schemas.contract import JOB_ID_RE

NOW = 1_700_000_000_000
DEFAULTS = {"interactive": 30_000, "batch": 3_600_000}
MAX_BODY = 64 * 1024

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEADER_NAMES = sorted(
    {v for k, v in vars(HEADERS).items() if k.isupper()}
    | {v for k, v in vars(DEAD_HEADERS).items() if k.isupper()}
    | {"x-death", "x-delivery-count", "job-id"}
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` about 70% of the time, so that fuzzing reaches the later checks too."""
    return st.integers(min_value=0, max_value=9).flatmap(lambda i: good if i < 7 else bad)


invalid_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80", b"\xf8\x88"])
digit_text = st.integers(min_value=0, max_value=10**25).map(str)
traceparents = st.from_regex(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", fullmatch=True)

# What an AMQP field table can decode to (pamqp), plus what a careless
# client can put there.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    digit_text,
    digit_text.map(str.encode),
    st.binary(max_size=300),
    invalid_utf8,
    st.decimals(allow_nan=True),
    st.datetimes(timezones=st.just(dt.UTC)),
    traceparents,
)
header_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Values a real producer would send, so that fuzzing also reaches valid jobs.
plausible_values = st.one_of(
    st.integers(min_value=0, max_value=2**53),
    st.integers(min_value=0, max_value=2**53).map(str),
    st.sampled_from(["gpt-4.1", "acme", "1"]),
    traceparents,
)
headers = st.dictionaries(
    st.sampled_from(HEADER_NAMES) | st.text(max_size=20),
    mostly(plausible_values, header_values),
    max_size=8,
)


def json_strategy(int_bits: int) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2 ** (int_bits - 1)), max_value=2 ** (int_bits - 1) - 1)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=50),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=20,
    )


# Jobs may hold any JSON; replies hold what orjson parsed from the upstream,
# whose integers fit in 64 bits (orjson reads larger ones as floats).
json_values = json_strategy(72)
reply_json_values = json_strategy(64)

valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool"])},
        optional={"content": json_values, "name": st.text(max_size=10)},
    ),
    min_size=1,
    max_size=3,
)
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values}) | json_values,
    max_size=3,
)
chat_bodies = st.fixed_dictionaries(
    {
        "model": mostly(st.sampled_from(["gpt-4.1", "gpt4"]), st.just("m" * 300) | json_values),
        "messages": mostly(valid_messages, messages | json_values),
    },
    optional={
        "max_tokens": st.integers(min_value=-5, max_value=2**64) | json_values,
        "max_completion_tokens": st.integers(min_value=-5, max_value=20_000_000) | json_values,
        "temperature": st.floats() | json_values,
        "stream": st.sampled_from([False, True, 0, 1, "false"]) | json_values,
        "extra": json_values,
    },
)


def dumps(value: Any) -> bytes:
    # json, not orjson: it writes ints beyond 64 bits and NaN, which orjson refuses to read.
    return json.dumps(value).encode()


bodies = mostly(
    chat_bodies.map(dumps),
    st.one_of(
        st.binary(max_size=2000),
        json_values.map(dumps),
        st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(min_value=1, max_value=3000).map(
            lambda n: (
                b'{"model":"m","messages":[{"role":"u","content":' + b"[" * n + b"]" * n + b"}]}"
            )
        ),
    ),
)
valid_ids = st.from_regex(JOB_ID_RE, fullmatch=True)
ids = mostly(valid_ids, st.none() | st.text(max_size=140))


def maybe(*good: str | None) -> st.SearchStrategy[str | None]:
    return mostly(st.sampled_from(good), st.text(max_size=300))


deliveries = st.builds(
    Delivery,
    body=bodies,
    routing_key=mostly(st.sampled_from(["interactive", "batch"]), st.text(max_size=100)),
    message_id=ids,
    correlation_id=ids,
    reply_to=maybe("replies", "amq.rabbitmq.reply-to.g1h2AA==", None),
    content_type=maybe("application/json", "", None),
    content_encoding=maybe("identity", "utf-8", None),
    headers=headers,
    timestamp_ms=st.none() | st.integers(min_value=0, max_value=2**53),
)


def decode(delivery: Delivery) -> Job | Rejected:
    return decode_job(delivery, now_ms=NOW, default_sla_ms=DEFAULTS, max_body_bytes=MAX_BODY)


def check(result: Job | Rejected) -> None:
    """The invariants of any decode outcome."""
    assert isinstance(result, Job | Rejected)
    if isinstance(result, Rejected):
        assert isinstance(result.code, ErrorCode)
        assert result.code in RETRIABLE
        assert isinstance(result.message, str)
        assert result.message
        for value in (result.job_id, result.correlation_id):
            assert value is None or JOB_ID_RE.fullmatch(value)
        # The rejection can always be answered.
        reply = Reply.model_validate(
            decode_reply(encode_reply(result.job_id, error=error_body(result.code, result.message)))
        )
        assert reply.error is not None
        assert reply.error.code is result.code
    else:
        assert JOB_ID_RE.fullmatch(result.job_id)
        assert JOB_ID_RE.fullmatch(result.correlation_id)
        assert result.sla_class in DEFAULTS
        assert isinstance(result.model, str)
        assert result.model
        assert isinstance(result.body, dict)
        assert isinstance(result.deadline_ms, int)
        assert not isinstance(result.deadline_ms, bool)
        assert isinstance(result.published_ms, int)
        assert result.output_cap is None or 1 <= result.output_cap <= 10_000_000
        assert result.prompt_chars >= 0
        assert result.replay_count >= 0


@FUZZ
@given(deliveries)
def test_any_delivery_decodes_or_is_rejected(delivery: Delivery) -> None:
    """Arbitrary properties, headers and bodies: a Job or a Rejected, never an exception."""
    check(decode(delivery))


@FUZZ
@given(st.binary(max_size=4000))
def test_any_body_bytes(raw: bytes) -> None:
    """Arbitrary bytes as the body of an otherwise valid job."""
    check(decode(Delivery(body=raw, message_id="job-1", reply_to="r")))


@FUZZ
@given(chat_bodies.map(dumps), headers)
def test_chat_shaped_bodies_and_headers(raw: bytes, table: dict[str, Any]) -> None:
    """Bodies close to a chat request, with arbitrary header tables."""
    check(decode(Delivery(body=raw, message_id="job-1", reply_to="r", headers=table)))


@FUZZ
@given(headers)
def test_any_headers_on_a_valid_job(table: dict[str, Any]) -> None:
    """A valid body with arbitrary headers: a bad header rejects, never raises."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    result = decode(Delivery(body=body, message_id="job-1", reply_to="r", headers=table))
    check(result)
    if isinstance(result, Rejected):
        assert result.code is ErrorCode.INVALID_REQUEST
        assert result.job_id == "job-1"


@FUZZ
@given(
    st.sampled_from([HEADERS.SLA_MS, HEADERS.DEADLINE_MS, HEADERS.PUBLISHED_MS]),
    st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.booleans(),
)
def test_deadline_headers_any_number(name: str, value: object) -> None:
    """Huge, negative, fractional and boolean values of time headers never crash."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user"}]})
    result = decode(Delivery(body=body, message_id="j", reply_to="r", headers={name: value}))
    check(result)
    if isinstance(result, Job):
        assert isinstance(value, int)
        assert not isinstance(value, bool)
        assert result.deadline_ms <= 2**53 + 7 * 24 * 3600 * 1000


@pytest.mark.parametrize(
    "depth", [1, 251, 252, 500, 1000, 1019, 1020, 1021, 1024, 1025, 1100, 100_000]
)
def test_deep_nesting(depth: int) -> None:
    """orjson reads 1,024 levels of nesting and writes only 255: a body must survive both
    (the worker forwards it), else it is an ``invalid_request`` rejection at intake."""
    nested = b"[" * depth + b"]" * depth
    raw = b'{"model":"m","messages":[{"role":"u","content":' + nested + b"}]}"
    try:
        orjson.dumps(orjson.loads(raw))
        parseable = True
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        parseable = False
    assert parseable == (depth + 3 <= 254)
    result = decode_job(
        Delivery(body=raw, message_id="j", reply_to="r"),
        now_ms=NOW,
        default_sla_ms=DEFAULTS,
        max_body_bytes=len(raw),
    )
    check(result)
    if parseable:
        assert isinstance(result, Job)
    else:
        assert isinstance(result, Rejected)
        assert result.code is ErrorCode.INVALID_REQUEST


def test_orjson_nesting_limit_is_json_decode_error() -> None:
    """The limit raises orjson.JSONDecodeError (a ValueError), which the codec catches."""
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" * 1025 + b"]" * 1025)
    assert orjson.loads(b"[" * 1024 + b"]" * 1024) is not None
    assert issubclass(orjson.JSONDecodeError, ValueError)


@FUZZ
@given(
    ids,
    st.sampled_from(list(ErrorCode)),
    st.text(max_size=200),
    st.dictionaries(st.text(max_size=10), reply_json_values, max_size=4),
)
def test_error_replies_round_trip(
    job_id: str | None, code: ErrorCode, message: str, routing: dict[str, Any]
) -> None:
    """Every error reply decodes with its code and retriable flag."""
    data = decode_reply(encode_reply(job_id, error=error_body(code, message), routing=routing))
    assert data["job_id"] == job_id
    assert data["status"] == "error"
    assert data["error"] == {"code": code.value, "message": message, "retriable": RETRIABLE[code]}
    assert data["routing"] == routing


@FUZZ
@given(st.dictionaries(st.text(max_size=10), reply_json_values, max_size=6))
def test_ok_replies_round_trip(response: dict[str, Any]) -> None:
    """The upstream's response comes back unchanged."""
    data = decode_reply(encode_reply("job-1", response=response))
    assert data["response"] == response
    assert Reply.model_validate(data).response == response


@FUZZ
@given(st.binary(max_size=500) | json_values.map(dumps))
def test_decode_reply_raises_only_value_error(raw: bytes) -> None:
    """decode_reply on garbage raises ValueError and nothing else."""
    try:
        data = decode_reply(raw)
    except ValueError:
        return
    assert data["status"] in ("ok", "error")


def test_strategies_reach_valid_jobs() -> None:
    """Sanity: the fuzzed deliveries include valid jobs, not only early rejections."""
    found = find(
        deliveries,
        lambda d: isinstance(decode(d), Job),
        settings=settings(max_examples=500, database=None, phases=[Phase.generate]),
    )
    assert isinstance(decode(found), Job)


def test_unusual_header_types() -> None:
    """Decimals and datetimes (AMQP decimal and timestamp) are rejected, not crashes."""
    body = orjson.dumps({"model": "m", "messages": [{"role": "user"}]})
    for value in (decimal.Decimal("1.5"), dt.datetime(2030, 1, 1, tzinfo=dt.UTC)):
        result = decode(Delivery(body=body, message_id="j", headers={HEADERS.DEADLINE_MS: value}))
        assert isinstance(result, Rejected)
        assert result.code is ErrorCode.INVALID_REQUEST
