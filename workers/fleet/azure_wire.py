"""Azure OpenAI's wire format as the fleet speaks it: paths, checks, error shapes.

Azure serves OpenAI's bodies under a deployment URL,
``/openai/deployments/{deployment}/chat/completions?api-version=V`` (and
``/embeddings``), behind an ``api-key`` header or an Entra ID bearer token.
Its own errors are ``{"error": {"code", "message"}}`` (a 401's and a 429's
code is the status as a string); request validation errors are OpenAI's. A
prompt holding :data:`CONTENT_FILTER_MARKER` is refused the way Azure's
content filter refuses one: HTTP 400, ``code: content_filter``. Nothing here
does I/O.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from workers.fleet.wire import Dialect, Refusal

__all__ = [
    "CONTENT_FILTER_MARKER",
    "OPERATIONS",
    "content_filter_refusal",
    "deployment_call",
    "dialect",
    "error",
    "filtered",
    "too_many_body",
    "version_refusal",
    "with_filter_results",
]

CONTENT_FILTER_MARKER = "[fleet:content_filter]"
"""Put this in a prompt to have an azure endpoint refuse it as its content filter would."""
OPERATIONS = ("chat/completions", "embeddings")
_PREFIX = "/openai/deployments/"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_SAFE = {"filtered": False, "severity": "safe"}
_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def error(status: int, code: str, message: str) -> Refusal:
    """Azure's own error envelope."""
    return Refusal(status, orjson.dumps({"error": {"code": code, "message": message}}))


def deployment_call(path: str) -> tuple[str, str] | None:
    """(deployment, operation) of a deployment URL's path; None for any other path."""
    if not path.startswith(_PREFIX):
        return None
    deployment, _, operation = path[len(_PREFIX) :].partition("/")
    if not deployment or operation not in OPERATIONS:
        return None
    return deployment, operation


def version_refusal(version: str | None) -> Refusal | None:
    """A missing or malformed ``api-version`` finds no resource, as on Azure."""
    if version is not None and _VERSION.match(version):
        return None
    return error(404, "404", "Resource not found")


BAD_KEY = error(
    401,
    "401",
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to"
    " provide a valid key for an active subscription and use a correct regional API"
    " endpoint for your resource. (fleet: api_key)",
)
UNKNOWN_DEPLOYMENT = error(
    404,
    "DeploymentNotFound",
    "The API deployment for this resource does not exist. If you created the deployment"
    " within the last 5 minutes, please wait a moment and try again. (fleet: models)",
)


def too_many_body(operation: str, version: str, after_s: float) -> bytes:
    """A 429 in Azure's words (the wait is in the headers too)."""
    name = "ChatCompletions_Create" if operation == "chat/completions" else "Embeddings_Create"
    return error(
        429,
        "429",
        f"Requests to the {name} Operation under Azure OpenAI API version {version} have"
        " exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry"
        f" after {max(1, round(after_s))} seconds. (fleet: rate_limit_rate)",
    ).body


def filtered(messages: list[Any]) -> bool:
    """Whether a prompt trips the fake content filter."""
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and CONTENT_FILTER_MARKER in content:
            return True
        if isinstance(content, list) and any(
            isinstance(p, dict) and CONTENT_FILTER_MARKER in str(p.get("text", "")) for p in content
        ):
            return True
    return False


def content_filter_refusal() -> Refusal:
    """The 400 of a prompt Azure's content filter blocks."""
    result = {c: dict(_SAFE) for c in _CATEGORIES}
    result["violence"] = {"filtered": True, "severity": "medium"}
    body = {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's"
            " content management policy. Please modify your prompt and retry. (fleet)",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": result,
            },
        }
    }
    return Refusal(400, orjson.dumps(body))


def with_filter_results(body: dict[str, Any]) -> bytes:
    """A chat completion as Azure returns it: content-filter annotations added."""
    safe = dict.fromkeys(_CATEGORIES, _SAFE)
    body["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": safe}]
    for choice in body["choices"]:
        choice["content_filter_results"] = safe
    return orjson.dumps(body)


def dialect(operation: str, version: str, after_s: float) -> Dialect:
    """Azure's words for one request (its 429 names the operation and api-version)."""
    return Dialect(lambda _: too_many_body(operation, version, after_s), with_filter_results)
