"""The gateway's pure decisions: keys, headers, bodies, and replies or errors to HTTP."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from producers.errors import (
    Backpressure,
    DeadlineExceeded,
    LlmqError,
    PublishFailed,
    Unroutable,
    UpstreamError,
)
from producers.gateway import _broker_problem
from producers.gateway_core import (
    BadRequest,
    Caller,
    KeyRing,
    answer_for_error,
    answer_for_reply,
    check_body,
    job_options,
    model_list,
    startup_problem,
)
from producers.gateway_keys import OPEN, scoped_job_id
from producers.gateway_server import loggable_path
from schemas.codec import MAX_SLA_MS
from schemas.contract import JOB_ID_RE
from schemas.errors import HTTP_STATUS, RETRIABLE, ErrorCode
from schemas.secrets import redact_url
from schemas.settings import ConfigError, GatewaySettings, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLMQ_* variable of the machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith("LLMQ_"):
            monkeypatch.delenv(name)


def settings(**gateway: Any) -> Settings:
    return Settings(
        endpoints=[
            {"name": "a", "base_url": "http://127.0.0.1:1/v1", "models": ["m1", "m2"]},
            {"name": "b", "base_url": "http://127.0.0.1:2/v1", "models": ["m2"]},
        ],
        models={"m1": {"aliases": ["one", "first"]}, "ghost": {"aliases": ["boo"]}},
        gateway=GatewaySettings(**gateway),
    )


# Keys


def test_keyring_accepts_each_key_as_a_bearer_token() -> None:
    """Any configured key works; the scheme is case-insensitive, spaces are trimmed."""
    ring = KeyRing(["sk-a", "sk-b"])
    assert ring.allows("Bearer sk-a")
    assert ring.allows("bearer sk-b")
    assert ring.allows("  Bearer   sk-b ")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic sk-a", "sk-a", "Bearer sk-a2", "Bearer sk-"]
)
def test_keyring_refuses_anything_else(header: str | None) -> None:
    """Missing, malformed, other schemes and near misses are refused."""
    assert not KeyRing(["sk-a"]).allows(header)


def test_keyring_compares_every_key_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match on the first key still compares all of them, in constant time each."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert KeyRing(["sk-a", "sk-b", "sk-c"]).allows("Bearer sk-a")
    assert len(calls) == 3
    # Digests, so every comparison has the same length whatever the keys' lengths.
    assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}


def test_each_key_names_its_caller_and_tenant() -> None:
    """identify() returns the key's short id and tenant; keys of one tenant share the tenant."""
    ring = KeyRing(["sk-bare"], {"acme": ["sk-acme-1", "sk-acme-2"], "globex": ["sk-globex"]})
    bare = ring.identify("Bearer sk-bare")
    acme1, acme2 = ring.identify("Bearer sk-acme-1"), ring.identify("Bearer sk-acme-2")
    globex = ring.identify("Bearer sk-globex")
    assert bare is not None and bare.tenant is None
    assert acme1 is not None and acme2 is not None and globex is not None
    assert (acme1.tenant, acme2.tenant, globex.tenant) == ("acme", "acme", "globex")
    ids = {c.key_id for c in (bare, acme1, acme2, globex)}
    assert len(ids) == 4 and all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    assert ring.identify("Bearer sk-acme") is None and ring.identify(None) is None
    assert KeyRing([]).identify("anything") == OPEN


def test_identify_compares_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenant keys too are all compared, whichever matches."""
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    ring = KeyRing(["sk-a"], {"t": ["sk-b", "sk-c"]})
    assert ring.identify("Bearer sk-a") == ring.identify("Bearer sk-a")
    assert len(calls) == 6


def test_job_ids_are_scoped_to_the_key() -> None:
    """Two keys never share a job id; the same key and request id always do."""
    ring = KeyRing(["sk-one", "sk-two"])
    one, two = ring.identify("Bearer sk-one"), ring.identify("Bearer sk-two")
    assert one is not None and two is not None
    assert scoped_job_id(one, "req-1") == scoped_job_id(one, "req-1")
    assert scoped_job_id(one, "req-1") != scoped_job_id(two, "req-1")
    assert scoped_job_id(one, "req-1") == f"gw-{one.key_id}-req-1"
    # A request id too long to prefix is hashed; the form cannot collide with a short one.
    long_id = "r" * 128
    scoped = scoped_job_id(one, long_id)
    assert JOB_ID_RE.fullmatch(scoped) and len(scoped) <= 128
    assert scoped.startswith(f"gw-{one.key_id}=")
    assert scoped_job_id(one, long_id[:-1] + "s") != scoped
    assert scoped_job_id(two, long_id) != scoped
    for request_id in ("a", "x" * 112, "x" * 113, "Z:@/+=-._" * 14):
        if JOB_ID_RE.fullmatch(request_id):
            assert JOB_ID_RE.fullmatch(scoped_job_id(one, request_id))


def test_answers_echo_the_callers_request_id() -> None:
    """x-request-id is the caller's id, x-llmq-job-id the scoped job id."""
    answer = answer_for_reply(reply("ok"), "gw-k-req", request_id="req")
    assert (answer.headers["x-request-id"], answer.headers["x-llmq-job-id"]) == ("req", "gw-k-req")
    failed = answer_for_error(Backpressure("full"), "gw-k-req", request_id="req")
    assert failed.headers["x-request-id"] == "req"


def test_empty_keyring_is_open_and_repr_hides_keys() -> None:
    """No keys configured: everyone is let in (require_auth refuses that at start)."""
    assert KeyRing([]).allows(None)
    assert KeyRing([]).empty
    ring = KeyRing(["sk-secret-value"])
    assert "sk-secret" not in repr(ring) and repr(ring) == "<KeyRing keys=1>"


# Start-up


def test_startup_accepts_tenant_keys_alone() -> None:
    tenants = {"tenants": {"acme": "ACME_KEYS"}, "tenant_keys": {"acme": (SecretStr("k"),)}}
    assert startup_problem(settings(**tenants)) is None


def test_startup_refuses_a_tenant_without_keys_and_a_key_given_twice() -> None:
    """A tenant's variable unset, or one key for two callers: refused, keys never shown."""
    unset = startup_problem(settings(tenants={"acme": "ACME_KEYS"}, api_keys=(SecretStr("k"),)))
    assert unset is not None and "gateway.tenants.acme" in unset and "ACME_KEYS" in unset
    twice = startup_problem(
        settings(
            api_keys=(SecretStr("sk-shared-secret"),),
            tenants={"acme": "A"},
            tenant_keys={"acme": (SecretStr("sk-shared-secret"),)},
        )
    )
    assert twice is not None and "gateway.tenants.acme" in twice
    assert "sk-shared" not in twice


def test_tenant_keys_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """[gateway.tenants] names variables; the keys are read at load and never printed."""
    monkeypatch.setenv("ACME_KEYS", "sk-acme-1, sk-acme-2")
    monkeypatch.setenv("LLMQ_GATEWAY_KEYS", "sk-bare")
    loaded = load_settings(None, gateway={"tenants": {"acme": "ACME_KEYS", "globex": "NOPE"}})
    gw = loaded.gateway
    assert [k.get_secret_value() for k in gw.tenant_keys["acme"]] == ["sk-acme-1", "sk-acme-2"]
    assert gw.tenant_keys["globex"] == ()
    assert [k.get_secret_value() for k in gw.api_keys] == ["sk-bare"]
    assert "sk-acme" not in repr(loaded) and "sk-acme" not in loaded.model_dump_json()
    assert startup_problem(loaded) is not None  # globex has no keys
    with pytest.raises(ConfigError, match="keys never go in the config"):
        load_settings(None, gateway={"tenant_keys": {"acme": ["sk-x"]}})
    with pytest.raises(ConfigError, match="environment variable name"):
        load_settings(None, gateway={"tenants": {"acme": "not a name"}})


def test_the_gateway_settings_are_documented() -> None:
    """docs/configuration.md names every [gateway] field."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for name in GatewaySettings.model_fields:
        assert f"`{name}`" in doc, name


def test_startup_refuses_require_auth_without_keys() -> None:
    """One line naming the variable to set and the way out."""
    problem = startup_problem(settings())
    assert problem is not None and "\n" not in problem
    assert "$LLMQ_GATEWAY_KEYS" in problem and "require_auth = false" in problem


@pytest.mark.parametrize(
    "gateway",
    [{"api_keys": (SecretStr("k"),)}, {"require_auth": False}],
)
def test_startup_accepts_keys_or_an_explicitly_open_gateway(gateway: dict[str, Any]) -> None:
    assert startup_problem(settings(**gateway)) is None


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        ({"sla_class": "urgent"}, "gateway.sla_class: unknown SLA class 'urgent'"),
        ({"default_sla_ms": 5000, "max_sla_ms": 1000}, "gateway.default_sla_ms (5000)"),
    ],
)
def test_startup_refuses_inconsistent_settings(gateway: dict[str, Any], expected: str) -> None:
    problem = startup_problem(settings(require_auth=False, **gateway))
    assert problem is not None and expected in problem


# Headers and bodies


def options(**headers: str) -> Any:
    return job_options(headers, default_sla_ms=30_000, max_sla_ms=600_000)


def test_sla_defaults_and_header() -> None:
    """No header: the default; a header: its value; both capped by max_sla_ms."""
    assert options().sla_ms == 30_000
    assert options(**{"X-LLMQ-SLA-Ms": "1500"}).sla_ms == 1500
    assert options(**{"X-LLMQ-SLA-Ms": " 250 "}).sla_ms == 250
    assert options(**{"X-LLMQ-SLA-Ms": "9999999"}).sla_ms == 600_000
    huge = job_options({"X-LLMQ-SLA-Ms": "9" * 20}, default_sla_ms=1, max_sla_ms=10**15)
    assert huge.sla_ms == MAX_SLA_MS  # never past what a worker accepts


@pytest.mark.parametrize("value", ["", "0", "-5", "+5", "1.5", "1e3", "abc", "٣", "1" * 21])
def test_bad_sla_header_is_refused(value: str) -> None:
    """Anything but a positive integer of ASCII digits is a 400, never ignored."""
    with pytest.raises(BadRequest, match="X-LLMQ-SLA-Ms"):
        options(**{"X-LLMQ-SLA-Ms": value})


def test_request_id_and_traceparent() -> None:
    """They pass on as the job's request id and traceparent."""
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    got = options(**{"X-Request-Id": "req-1:2", "traceparent": tp})
    assert (got.request_id, got.traceparent) == ("req-1:2", tp)
    assert options(traceparent="x" * 300).traceparent is None  # dropped, not refused
    assert (options().tenant, options().request_id, options().traceparent) == (None, None, None)


def test_the_tenant_is_the_keys_and_the_header_cannot_choose_one() -> None:
    """X-LLMQ-Tenant is ignored unless the operator trusts it (a proxy sets it)."""
    acme = Caller("k1", "acme")
    claim = {"X-LLMQ-Tenant": "globex"}
    limits = {"default_sla_ms": 30_000, "max_sla_ms": 600_000}
    assert job_options(claim, caller=acme, **limits).tenant == "acme"
    assert job_options(claim, caller=Caller("k2"), **limits).tenant is None
    assert job_options(claim, **limits).tenant is None
    trusted = job_options(claim, caller=acme, trust_tenant_header=True, **limits)
    assert trusted.tenant == "globex"
    assert job_options({}, caller=acme, trust_tenant_header=True, **limits).tenant == "acme"
    # Ignored means ignored: a malformed header is no reason to refuse.
    assert job_options({"X-LLMQ-Tenant": "a\tb"}, caller=acme, **limits).tenant == "acme"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-LLMQ-Tenant": ""},
        {"X-LLMQ-Tenant": "t" * 257},
        {"X-LLMQ-Tenant": "a\tb"},
        {"X-Request-Id": "has space"},
        {"X-Request-Id": "-leading-dash"},
        {"X-Request-Id": "x" * 129},
    ],
)
def test_bad_tenant_or_request_id_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(BadRequest):
        job_options(headers, default_sla_ms=1, max_sla_ms=1, trust_tenant_header=True)


@pytest.mark.parametrize("body", [[1], "text", 3, None])
def test_body_must_be_an_object(body: object) -> None:
    with pytest.raises(BadRequest, match="JSON object"):
        check_body(body)


@pytest.mark.parametrize("stream", [1, 0, "yes", "true", [], {}])
def test_stream_must_be_a_boolean(stream: object) -> None:
    with pytest.raises(BadRequest, match="stream"):
        check_body({"model": "m", "messages": [], "stream": stream})


def test_streaming_is_for_chat_only() -> None:
    body = {"model": "m", "messages": [], "stream": True}
    assert check_body(body) is body
    with pytest.raises(BadRequest, match="embeddings"):
        check_body({"model": "m", "input": "x", "stream": True}, may_stream=False)
    assert check_body({"model": "m", "input": "x", "stream": False}, may_stream=False)


def test_body_passes_through_unchanged() -> None:
    """The worker validates the rest: unknown fields stay."""
    body = {"model": "m", "messages": [], "stream": False, "seed": 7, "tools": []}
    assert check_body(body) is body


# Replies and errors to HTTP


def reply(status: str = "error", **error: Any) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "job_id": "j1",
        "status": status,
        "response": {"object": "chat.completion", "choices": []} if status == "ok" else None,
        "error": error or None,
        "routing": {"endpoint": "a", "attempts": 2},
    }


def test_ok_reply_is_the_upstream_response_with_routing_headers() -> None:
    answer = answer_for_reply(reply("ok"), "j1")
    assert answer.status == 200 and answer.body == {"object": "chat.completion", "choices": []}
    assert answer.headers == {
        "x-llmq-job-id": "j1",
        "x-request-id": "j1",
        "x-llmq-endpoint": "a",
        "x-llmq-attempts": "2",
    }


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_gets_its_status_and_an_openai_error_body(code: ErrorCode) -> None:
    answer = answer_for_reply(reply(code=code.value, message="why", retriable=True), "j1")
    assert answer.status == HTTP_STATUS[code]
    assert answer.body == {
        "error": {
            "message": "why",
            "type": answer.body["error"]["type"],
            "param": None,
            "code": code.value,
        }
    }
    assert answer.headers["x-should-retry"] == str(RETRIABLE[code]).lower()
    assert answer.headers["x-llmq-endpoint"] == "a"
    assert ("Retry-After" in answer.headers) == (answer.status == 429 and RETRIABLE[code])


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (ErrorCode.INVALID_REQUEST, "invalid_request_error"),
        (ErrorCode.PAYLOAD_TOO_LARGE, "invalid_request_error"),
        (ErrorCode.OVER_CAPACITY, "rate_limit_error"),
        (ErrorCode.UPSTREAM_ERROR, "server_error"),
        (ErrorCode.DEADLINE_EXCEEDED, "server_error"),
    ],
)
def test_error_types_follow_openai(status: ErrorCode, kind: str) -> None:
    answer = answer_for_reply(reply(code=status.value, message="m"), "j1")
    assert answer.body["error"]["type"] == kind


def test_unknown_code_is_a_500_judged_by_its_retriable_flag() -> None:
    """A newer worker's code: decoded tolerantly, as docs/protocol.md asks."""
    answer = answer_for_reply(reply(code="brand_new", message="m", retriable=True), "j1")
    assert answer.status == 500 and answer.body["error"]["code"] == "brand_new"
    assert answer.headers["x-should-retry"] == "true"


ERRORS: list[tuple[Callable[[], LlmqError], int, str]] = [
    (lambda: Backpressure("full"), 429, "over_capacity"),
    (lambda: PublishFailed("broker unreachable"), 503, "broker_unavailable"),
    (lambda: Unroutable("no queue"), 500, "internal_error"),
    (lambda: DeadlineExceeded("no reply", job_id="j1", reply={}), 504, "deadline_exceeded"),
]


@pytest.mark.parametrize(("make", "status", "code"), ERRORS)
def test_client_errors_map_to_statuses(
    make: Callable[[], LlmqError], status: int, code: str
) -> None:
    answer = answer_for_error(make(), "j1")
    assert (answer.status, answer.body["error"]["code"]) == (status, code)
    assert answer.headers["x-llmq-job-id"] == "j1"
    assert ("Retry-After" in answer.headers) == (status in (429, 503))


def test_job_failed_with_a_reply_maps_like_the_reply() -> None:
    err = UpstreamError("x", job_id="j1", reply=reply(code="upstream_error", message="m"))
    assert answer_for_error(err, "j1").status == 502


# Models


def test_models_are_the_served_models_and_their_aliases() -> None:
    """Sorted; aliases of a model no endpoint serves are not routable."""
    listed = model_list(settings())
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["first", "m1", "m2", "one"]
    assert listed["data"][0] == {"id": "first", "object": "model", "created": 0, "owned_by": "llmq"}


# Secrets in operator output and logs


def test_broker_problem_never_shows_the_password() -> None:
    """Raw or percent-decoded, the broker password is masked in the start-up error."""
    url = "amqp://llmq:p%40ss-s3cret@rabbit:5672/v"
    loaded = load_settings(None, broker={"url": url})
    text = _broker_problem(loaded, ConnectionError(f"login p@ss-s3cret refused at {url}"))
    assert "s3cret" not in text and text.startswith("cannot reach the broker at rabbit:5672: ")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://admin:s3cret@127.0.0.1:1/", "http://admin:***@127.0.0.1:1/"),
        ("amqps://u:p%40ss@h:5671/v?heartbeat=5", "amqps://u:***@h:5671/v?heartbeat=5"),
        ("http://127.0.0.1:15672", "http://127.0.0.1:15672"),
        ("http://u:s3cret@[::1/", "[unparseable URL]"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("/v1/models", "/v1/models"),
        ("/v1/models?api_key=sk-secret-xyz", "/v1/models?[redacted]"),
        ("/healthz?", "/healthz"),
        ("/v1/sk-secret-xyz/x", "/v1/[redacted]/x"),
    ],
)
def test_logged_paths_carry_no_query_string(raw: str, logged: str) -> None:
    assert loggable_path(raw) == logged
    assert len(loggable_path("/" + "a" * 10_000)) <= 256
