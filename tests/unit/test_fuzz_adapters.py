"""Property tests: no job body a worker admits and no answer an upstream sends can
make a provider adapter raise anything but ``UpstreamFailure``.

An exception of another class would leave the attempt as "cancelled" and the
job to the crash path; a defined outcome is a reply with a code (hostile input).
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import Delivery, Job, decode_job
from schemas.contract import HEADERS, JobKind
from schemas.settings import load_settings
from workers.errors import UpstreamFailure
from workers.providers import adapter_for
from workers.providers.base import Adapter

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ENDPOINTS: list[dict[str, Any]] = [
    {"name": "o", "base_url": "https://api.openai.com/v1", "models": ["m"]},
    {
        "name": "az",
        "kind": "azure",
        "base_url": "https://res.openai.azure.com",
        "api_version": "2024-10-21",
        "models": {"m": "dep"},
    },
    {"name": "an", "kind": "anthropic", "base_url": "https://api.anthropic.com", "models": ["m"]},
]


@pytest.fixture(scope="module")
def adapters() -> list[Adapter]:
    return [adapter_for(e) for e in load_settings(None, endpoints=ENDPOINTS).endpoints]


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
KEYS = [
    "role", "content", "type", "text", "image_url", "url", "tool_calls", "function",
    "name", "arguments", "tool_call_id", "tools", "tool_choice", "stop", "n",
    "max_tokens", "temperature", "top_p", "response_format", "user", "parameters",
    "cache_control", "logprobs", "id", "input_audio", "file", "detail",
]  # fmt: skip
known = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "x"])
message = st.builds(lambda role, extra: {**extra, "role": role}, roles, known)
chat_body = st.builds(
    lambda messages, extra: {**extra, "model": "m", "messages": messages},
    st.lists(message, min_size=1, max_size=5),
    known,
)


# Bodies shaped like real ones, values hostile: they get past the first check of
# each translation and reach the deeper ones (tools, parts, tool results).
text = st.text(max_size=10)
args = st.sampled_from(["{}", '{"a": 1}', "[1]", "nope"]) | json_values
image = st.sampled_from(["data:image/png;base64,AAAA", "https://x/y.png", "data:", "ftp://x"])
part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "text", "image_url", "input_audio"])},
    optional={
        "text": text | json_values,
        "image_url": st.fixed_dictionaries({"url": image | json_values}) | json_values,
    },
)
function = st.fixed_dictionaries({"name": text | json_values}, optional={"arguments": args})
tool_call = st.fixed_dictionaries(
    {"id": text | json_values, "type": st.just("function"), "function": function}
)
plausible_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "user", "assistant", "tool"])},
    optional={
        "content": text | st.lists(part, max_size=3) | json_values,
        "tool_calls": st.lists(tool_call, max_size=2),
        "tool_call_id": text,
    },
)
schema = st.fixed_dictionaries({"type": st.just("object")}) | json_values
tool = st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": text | json_values}, optional={"description": text, "parameters": schema}
    )}
)  # fmt: skip
plausible_body = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(plausible_message, min_size=1, max_size=5)},
    optional={
        "tools": st.lists(tool, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
        "stop": text | st.lists(text, max_size=3),
        "max_tokens": st.integers(1, 10_000),
        "temperature": st.floats(0, 1),
        "user": text,
    },
)


def admitted(body: dict[str, Any], kind: JobKind) -> Job | None:
    """The job a worker would admit with this body, else None (it never reaches an adapter)."""
    try:
        raw = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return None
    decoded = decode_job(
        Delivery(body=raw, message_id="j", reply_to="r", headers={HEADERS.KIND: kind.value}),
        now_ms=1_700_000_000_000,
        default_sla_ms={"interactive": 1000},
        max_body_bytes=1 << 20,
    )
    return decoded if isinstance(decoded, Job) else None


@FUZZ
@given(body=chat_body | plausible_body)
def test_any_admitted_chat_body_is_sent_or_refused(adapters: list[Adapter], body: Any) -> None:
    job = admitted(body, JobKind.CHAT)
    if job is None:
        return
    for adapter in adapters:
        try:
            call = adapter.call(job.kind, job.body, "upstream-m")
        except UpstreamFailure:
            continue
        assert orjson.loads(call.body)["model"] in ("upstream-m", "m")


@FUZZ
@given(
    body=st.dictionaries(
        st.sampled_from(["input", "dimensions", "encoding_format", "user"]), json_values
    )
)
def test_any_admitted_embedding_body_is_sent_or_refused(
    adapters: list[Adapter], body: dict[str, Any]
) -> None:
    job = admitted({**body, "model": "m"}, JobKind.EMBEDDING)
    if job is None:
        return
    for adapter in adapters:
        try:
            adapter.call(job.kind, job.body, "upstream-m")
        except UpstreamFailure:
            continue


answers = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(
            [
                "choices",
                "content",
                "usage",
                "data",
                "error",
                "type",
                "stop_reason",
                "id",
                "model",
                "object",
            ]
        ),
        json_values,
        max_size=6,
    ).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(
    status=st.sampled_from([200, 200, 200, 400, 401, 404, 408, 413, 429, 500, 503, 529, 418]),
    raw=answers,
    retry=st.one_of(st.none(), st.text(max_size=30)),
    kind=st.sampled_from(list(JobKind)),
)
def test_any_answer_is_a_reply_or_an_upstream_failure(
    adapters: list[Adapter], status: int, raw: bytes, retry: str | None, kind: JobKind
) -> None:
    headers = {} if retry is None else {"retry-after": retry, "retry-after-ms": retry}
    waits: list[float | None] = []
    for adapter in adapters:
        try:
            reply = adapter.answer(kind, status, headers, raw, now=1_700_000_000.0)
        except UpstreamFailure as failure:
            waits.append(failure.retry_after_s)
            continue
        assert status == 200
        assert isinstance(reply.body, dict)
        orjson.dumps(reply.body)  # forwardable as the reply's response
    assert all(w is None or 0 <= w <= 300 for w in waits)
