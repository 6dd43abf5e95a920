"""The fleet's provider kinds and embeddings, without sockets: paths, checks, bodies, plans."""

from __future__ import annotations

import base64
import random
import struct
from typing import Any

import orjson
import pytest

from workers.fleet import Endpoint, plan_request
from workers.fleet import azure_wire as azure
from workers.fleet.wire import EmbeddingCall, Refusal, embeddings_body, parse_embeddings


def endpoint(**fields: Any) -> Endpoint:
    return Endpoint.model_validate({"name": "e", "models": ["m"], **fields})


def test_kind_defaults_to_openai_and_takes_azure() -> None:
    assert endpoint().kind == "openai"
    assert endpoint(kind="azure").kind == "azure"
    with pytest.raises(ValueError, match="kind"):
        endpoint(kind="bedrock")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/openai/deployments/gpt41/chat/completions", ("gpt41", "chat/completions")),
        ("/openai/deployments/ada/embeddings", ("ada", "embeddings")),
        ("/openai/deployments//chat/completions", None),
        ("/openai/deployments/gpt41/completions", None),
        ("/v1/chat/completions", None),
    ],
)
def test_azure_paths(path: str, expected: tuple[str, str] | None) -> None:
    assert azure.deployment_call(path) == expected


@pytest.mark.parametrize("version", [None, "", "latest", "2024-10-21x"])
def test_azure_without_a_valid_api_version_finds_nothing(version: str | None) -> None:
    refusal = azure.version_refusal(version)
    assert refusal is not None and refusal.status == 404
    assert orjson.loads(refusal.body) == {"error": {"code": "404", "message": "Resource not found"}}


def test_azure_api_versions_accepted() -> None:
    assert azure.version_refusal("2024-10-21") is None
    assert azure.version_refusal("2025-04-01-preview") is None


def test_azure_content_filter_refusal_shape() -> None:
    assert azure.filtered([{"role": "user", "content": f"say {azure.CONTENT_FILTER_MARKER}"}])
    parts = [{"type": "text", "text": azure.CONTENT_FILTER_MARKER}]
    assert azure.filtered([{"role": "user", "content": parts}])
    assert not azure.filtered([{"role": "user", "content": "fine"}])
    refusal = azure.content_filter_refusal()
    error = orjson.loads(refusal.body)["error"]
    assert refusal.status == 400 and error["code"] == "content_filter"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"


def test_azure_429_names_its_operation_and_wait() -> None:
    error = orjson.loads(azure.too_many_body("embeddings", "2024-10-21", 6.0))["error"]
    assert error["code"] == "429"
    assert "Embeddings_Create" in error["message"] and "2024-10-21" in error["message"]
    assert "retry after 6 seconds" in error["message"]


def test_parse_embeddings_forms() -> None:
    models = ("m",)
    one = parse_embeddings(orjson.dumps({"model": "m", "input": "x" * 40}), models)
    assert isinstance(one, EmbeddingCall) and (len(one.inputs), one.tokens) == (1, 10)
    many = parse_embeddings(orjson.dumps({"model": "m", "input": ["a" * 8, "b" * 4]}), models)
    assert isinstance(many, EmbeddingCall) and (len(many.inputs), many.tokens) == (2, 3)
    tokens = parse_embeddings(orjson.dumps({"model": "m", "input": [1, 2, 3]}), models)
    assert isinstance(tokens, EmbeddingCall) and (len(tokens.inputs), tokens.tokens) == (1, 3)
    arrays = parse_embeddings(orjson.dumps({"model": "m", "input": [[1, 2], [3]]}), models)
    assert isinstance(arrays, EmbeddingCall) and (len(arrays.inputs), arrays.tokens) == (2, 3)
    deployed = parse_embeddings(orjson.dumps({"input": "x"}), models, deployment="m")
    assert isinstance(deployed, EmbeddingCall) and deployed.model == "m"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "m", "input": ""}, 400),
        ({"model": "m", "input": []}, 400),
        ({"model": "m", "input": ["a", ""]}, 400),
        ({"model": "m"}, 400),
        ({"input": "x"}, 400),
        ({"model": "m", "input": "x", "encoding_format": "hex"}, 400),
        ({"model": "other", "input": "x"}, 404),
    ],
)
def test_parse_embeddings_refusals(body: dict[str, Any], status: int) -> None:
    refusal = parse_embeddings(orjson.dumps(body), ("m",))
    assert isinstance(refusal, Refusal) and refusal.status == status


def test_embeddings_body_is_openai_shaped() -> None:
    call = parse_embeddings(orjson.dumps({"model": "m", "input": ["ab", "cd"]}), ("m",))
    assert isinstance(call, EmbeddingCall)
    body = orjson.loads(embeddings_body(call, usage=True))
    assert body["object"] == "list" and body["model"] == "m"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 8 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": call.tokens, "total_tokens": call.tokens}
    assert "usage" not in orjson.loads(embeddings_body(call, usage=False))


def test_embeddings_in_base64_are_float32() -> None:
    raw = orjson.dumps({"model": "m", "input": "ab", "encoding_format": "base64"})
    call = parse_embeddings(raw, ("m",))
    assert isinstance(call, EmbeddingCall)
    [item] = orjson.loads(embeddings_body(call, usage=True))["data"]
    vector = struct.unpack("<8f", base64.b64decode(item["embedding"]))
    plain = parse_embeddings(orjson.dumps({"model": "m", "input": "ab"}), ("m",))
    assert isinstance(plain, EmbeddingCall)
    [expected] = orjson.loads(embeddings_body(plain, usage=True))["data"]
    assert vector == pytest.approx(expected["embedding"], abs=1e-6)


def test_embedding_time_grows_with_the_input() -> None:
    """Latency plus ms_per_input_token per token; nothing generated."""
    e = endpoint(latency_ms=10, ms_per_token=5, ms_per_input_token=0.5)
    small = plan_request(e, random.Random(1), 0, input_tokens=10)
    big = plan_request(e, random.Random(1), 0, input_tokens=1000)
    assert small.delay_s == pytest.approx(0.010 + 0.005)
    assert big.delay_s == pytest.approx(0.010 + 0.500)
    assert small.completion_tokens == big.completion_tokens == 0
