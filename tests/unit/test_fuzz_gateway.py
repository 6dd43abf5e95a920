"""Hostile gateway requests, fuzzed: every one gets a defined answer or a
BadRequest (HTTP 400), never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.gateway_core import (
    REQUEST_ID_HEADER,
    SLA_HEADER,
    TENANT_HEADER,
    TRACEPARENT_HEADER,
    BadRequest,
    KeyRing,
    answer_for_reply,
    check_body,
    job_options,
)
from schemas.errors import ErrorCode

HEADER_NAMES = st.sampled_from([SLA_HEADER, TENANT_HEADER, REQUEST_ID_HEADER, TRACEPARENT_HEADER])
TEXT = st.text(max_size=300) | st.from_regex(r"-?[0-9]{1,40}(\.[0-9]+)?(e[0-9]+)?", fullmatch=True)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=30,
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(headers=st.dictionaries(HEADER_NAMES, TEXT, max_size=4))
def test_headers_give_options_or_a_bad_request(headers: dict[str, str]) -> None:
    try:
        options = job_options(headers, default_sla_ms=30_000, max_sla_ms=600_000)
    except BadRequest:
        return
    assert 0 < options.sla_ms <= 600_000
    if options.tenant is not None:
        assert options.tenant.isprintable()


@FAST
@given(body=JSON)
def test_bodies_are_checked_without_crashing(body: Any) -> None:
    try:
        checked = check_body(body)
    except BadRequest:
        return
    assert isinstance(checked, dict)
    assert checked.get("stream") is None or isinstance(checked["stream"], bool)


@FAST
@given(authorization=st.none() | st.text(max_size=200))
def test_any_authorization_header_is_a_yes_or_no(authorization: str | None) -> None:
    ring = KeyRing(["sk-the-right-key"])
    assert ring.allows(authorization) is (
        authorization is not None
        and authorization.strip().lower().startswith("bearer ")
        and authorization.strip()[7:].strip() == "sk-the-right-key"
    )


@FAST
@given(
    code=st.sampled_from([c.value for c in ErrorCode]) | st.text(max_size=20),
    routing=st.dictionaries(st.text(max_size=12), JSON, max_size=5),
)
def test_any_error_reply_maps_to_an_http_answer(code: str, routing: dict[str, Any]) -> None:
    reply = {
        "status": "error",
        "job_id": "j",
        "error": {"code": code, "message": "m", "retriable": True},
        "routing": routing,
    }
    answer = answer_for_reply(reply, "j")
    assert 400 <= answer.status < 600
