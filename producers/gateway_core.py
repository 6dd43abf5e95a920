"""The gateway's decisions, without I/O: HTTP in, job options out; replies in, HTTP out.

``producers.gateway`` does the aiohttp and AMQP work; everything it decides —
whether it may start, what the SLA and tenant of a request are, which status
and OpenAI-style error body a reply or a client error becomes — is here, so it
is testable without a server or a broker. Who the caller is (keys, tenants,
job ids scoped to a key) is :mod:`producers.gateway_keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from producers.errors import (
    Backpressure,
    DeadlineExceeded,
    JobFailed,
    LlmqError,
    PublishFailed,
    Unroutable,
)
from producers.gateway_keys import OPEN, Caller, KeyRing, duplicate_keys
from schemas.codec import MAX_SLA_MS
from schemas.contract import JOB_ID_RE
from schemas.errors import HTTP_STATUS, RETRIABLE, ErrorCode
from schemas.settings import Settings

__all__ = [
    "INVALID_API_KEY",
    "NOT_FOUND",
    "REQUEST_ID_HEADER",
    "REQUEST_TIMEOUT",
    "SERVICE_UNAVAILABLE",
    "SLA_HEADER",
    "TENANT_HEADER",
    "TRACEPARENT_HEADER",
    "Answer",
    "BadRequest",
    "Caller",
    "JobOptions",
    "KeyRing",
    "answer_for_error",
    "answer_for_reply",
    "check_body",
    "error_answer",
    "job_options",
    "model_list",
    "startup_problem",
]

SLA_HEADER = "X-LLMQ-SLA-Ms"
TENANT_HEADER = "X-LLMQ-Tenant"
REQUEST_ID_HEADER = "X-Request-Id"
TRACEPARENT_HEADER = "traceparent"

# Gateway-only error codes, beside the job error codes of schemas.errors.
INVALID_API_KEY = "invalid_api_key"
SERVICE_UNAVAILABLE = "broker_unavailable"
NOT_FOUND = "not_found"
REQUEST_TIMEOUT = "request_timeout"

_MAX_STRING_HEADER = 256  # the job contract's limit for string headers
_MAX_DIGITS = 20  # the job contract's limit for integer headers sent as text
_BACKPRESSURE_RETRY_AFTER_S = 1
_CODES = frozenset(c.value for c in ErrorCode)


class BadRequest(ValueError):
    """A request the gateway refuses before publishing anything (400)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP response to send: status, JSON body, extra headers."""

    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What the request says about the job, with the tenant its caller is billed to."""

    sla_ms: int
    tenant: str | None = None
    request_id: str | None = None
    """The caller's ``X-Request-Id``; the job id is :func:`scoped_job_id` of it."""
    traceparent: str | None = None


def startup_problem(settings: Settings) -> str | None:
    """One line saying why the gateway must not start with these settings, or None."""
    gw = settings.gateway
    for tenant, env in gw.tenants.items():
        if not gw.tenant_keys.get(tenant):
            return (
                f"config error: gateway.tenants.{tenant}: environment variable {env}"
                f" is not set (it holds the tenant's keys, comma-separated)"
            )
    clashes = duplicate_keys(gw)
    if clashes:
        return f"config error: the same API key is given in {clashes[0]}: a key names one caller"
    if gw.require_auth and not gw.api_keys and not gw.tenants:
        where = f"${gw.api_keys_env}" if gw.api_keys_env else "gateway.api_keys_env"
        return (
            f"config error: gateway.require_auth is true but no API keys are set:"
            f" put comma-separated keys in {where} (or tenants' keys in [gateway.tenants]),"
            f" or set gateway.require_auth = false on a trusted network"
        )
    if gw.metrics_port is not None and gw.metrics_port == gw.port != 0:
        return "config error: gateway.metrics_port must differ from gateway.port"
    if gw.sla_class not in settings.topology.classes:
        known = ", ".join(sorted(settings.topology.classes))
        return f"config error: gateway.sla_class: unknown SLA class {gw.sla_class!r}; use {known}"
    if gw.default_sla_ms > gw.max_sla_ms:
        return (
            f"config error: gateway.default_sla_ms ({gw.default_sla_ms}) is above"
            f" gateway.max_sla_ms ({gw.max_sla_ms})"
        )
    return None


def job_options(
    headers: Mapping[str, str],
    *,
    default_sla_ms: int,
    max_sla_ms: int,
    caller: Caller = OPEN,
    trust_tenant_header: bool = False,
) -> JobOptions:
    """Read the SLA, request id and traceparent headers; raises :class:`BadRequest`.

    The tenant is the caller's (its key's). ``X-LLMQ-Tenant`` is read only with
    ``trust_tenant_header`` (a proxy that knows the caller sets it); otherwise
    it is ignored, so no caller can bill another tenant.
    """
    tenant = caller.tenant
    if trust_tenant_header:
        tenant = _tenant(headers.get(TENANT_HEADER)) or tenant
    return JobOptions(
        sla_ms=_sla_ms(headers.get(SLA_HEADER), default=default_sla_ms, maximum=max_sla_ms),
        tenant=tenant,
        request_id=_request_id(headers.get(REQUEST_ID_HEADER)),
        traceparent=_traceparent(headers.get(TRACEPARENT_HEADER)),
    )


def _sla_ms(value: str | None, *, default: int, maximum: int) -> int:
    if value is None:
        return min(default, maximum, MAX_SLA_MS)
    text = value.strip()
    # Digits only: no sign, no decimals, no exponent ("1e3"), no unicode digits.
    if not (0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()) or not int(text):
        raise BadRequest(f"header {SLA_HEADER} must be a positive integer (ms), not {value[:40]!r}")
    return min(int(text), maximum, MAX_SLA_MS)


def _tenant(value: str | None) -> str | None:
    if value is None:
        return None
    if not 0 < len(value) <= _MAX_STRING_HEADER or not value.isprintable():
        raise BadRequest(
            f"header {TENANT_HEADER} must be 1 to {_MAX_STRING_HEADER} printable characters"
        )
    return value


def _request_id(value: str | None) -> str | None:
    if value is None:
        return None
    if JOB_ID_RE.fullmatch(value) is None:
        raise BadRequest(
            f"header {REQUEST_ID_HEADER} must be 1 to 128 characters: a letter or digit,"
            " then letters, digits or ._:@/+=-"
        )
    return value


def _traceparent(value: str | None) -> str | None:
    # Passed on as is: workers drop a malformed one (W3C), never reject the job.
    # Only an absurd length is cut here, so it never rides along in the message.
    if value is None or len(value) > _MAX_STRING_HEADER:
        return None
    return value


def check_body(body: object, *, may_stream: bool = True) -> dict[str, Any]:
    """The parsed request body as a job body; raises :class:`BadRequest`.

    Only what the gateway must know is checked here (an object; ``stream`` a
    boolean, and only where ``may_stream``: chat, not embeddings); the worker
    validates the rest, so one set of rules answers every producer.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    stream = body.get("stream")
    if stream is not None and stream is not False:
        # Not truthiness: 1 == True, and "yes" is truthy, but OpenAI wants a boolean.
        if stream is not True:
            raise BadRequest("stream must be true, false or absent")
        if not may_stream:
            raise BadRequest("stream is not supported here: embeddings answer in one response")
    return body


def error_answer(
    status: int,
    code: str,
    message: str,
    *,
    retriable: bool | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """An OpenAI-style error response.

    ``x-should-retry`` tells the OpenAI SDKs, which retry 429 and 5xx on their
    own, whether retrying can help (no for ``over_budget`` or ``internal_error``).
    """
    extra = dict(headers or {})
    if retriable is not None:
        extra["x-should-retry"] = "true" if retriable else "false"
    body = {"error": {"message": message, "type": _error_type(status), "param": None, "code": code}}
    return Answer(status, body, extra)


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def _id_headers(job_id: str, request_id: str | None) -> dict[str, str]:
    return {"x-llmq-job-id": job_id, "x-request-id": request_id or job_id}


def _routing_headers(
    reply: Mapping[str, Any], job_id: str, request_id: str | None
) -> dict[str, str]:
    headers = _id_headers(job_id, request_id)
    routing = reply.get("routing") or {}
    if routing.get("endpoint") is not None:
        headers["x-llmq-endpoint"] = str(routing["endpoint"])
    if routing.get("attempts") is not None:
        headers["x-llmq-attempts"] = str(routing["attempts"])
    return headers


def answer_for_reply(
    reply: Mapping[str, Any], job_id: str, *, request_id: str | None = None
) -> Answer:
    """The HTTP response for a reply envelope: the upstream's response, or its error.

    ``x-request-id`` echoes the caller's own id; ``x-llmq-job-id`` is the job's.
    """
    headers = _routing_headers(reply, job_id, request_id)
    if reply.get("status") == "ok" and isinstance(reply.get("response"), dict):
        return Answer(200, reply["response"], headers)
    error = reply.get("error") or {}
    code = str(error.get("code") or ErrorCode.INTERNAL_ERROR.value)
    known = code in _CODES
    status = HTTP_STATUS[ErrorCode(code)] if known else 500
    # Decode tolerantly (docs/protocol.md): an unknown code is judged by its flag.
    retriable = RETRIABLE[ErrorCode(code)] if known else bool(error.get("retriable"))
    if status == 429 and retriable:
        headers["Retry-After"] = str(_BACKPRESSURE_RETRY_AFTER_S)
    message = str(error.get("message") or code)
    return error_answer(status, code, message, retriable=retriable, headers=headers)


def answer_for_error(exc: LlmqError, job_id: str, *, request_id: str | None = None) -> Answer:
    """The HTTP response for a job the gateway could not get an answer for."""
    headers = _id_headers(job_id, request_id)
    if isinstance(exc, JobFailed) and exc.reply:
        return answer_for_reply(exc.reply, job_id, request_id=request_id)
    if isinstance(exc, DeadlineExceeded):
        return error_answer(
            504, ErrorCode.DEADLINE_EXCEEDED.value, str(exc), retriable=True, headers=headers
        )
    if isinstance(exc, Backpressure):
        headers["Retry-After"] = str(_BACKPRESSURE_RETRY_AFTER_S)
        return error_answer(
            429, ErrorCode.OVER_CAPACITY.value, str(exc), retriable=True, headers=headers
        )
    if isinstance(exc, Unroutable):
        # A deployment problem (topology not applied, wrong gateway.sla_class).
        return error_answer(
            500, ErrorCode.INTERNAL_ERROR.value, str(exc), retriable=False, headers=headers
        )
    if isinstance(exc, PublishFailed):
        headers["Retry-After"] = str(_BACKPRESSURE_RETRY_AFTER_S)
        return error_answer(503, SERVICE_UNAVAILABLE, str(exc), retriable=True, headers=headers)
    return error_answer(
        500, ErrorCode.INTERNAL_ERROR.value, str(exc), retriable=False, headers=headers
    )


def model_list(settings: Settings) -> dict[str, Any]:
    """``GET /v1/models``: every canonical model an endpoint serves, and their aliases."""
    served = settings.served_models()
    names = set(served)
    for name, spec in settings.models.items():
        if name in names:
            names.update(spec.aliases)
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "llmq"} for n in sorted(names)]
    return {"object": "list", "data": data}
