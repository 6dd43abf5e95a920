"""OpenAI chat request → Anthropic Messages request: the fixtures, each rule, each refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from workers.providers.anthropic_messages import (
    DEFAULT_MAX_TOKENS,
    Untranslatable,
    to_messages,
)
from workers.routing import RoutingConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers" / "anthropic"
MODEL = "claude-sonnet-4-5-20250929"


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def user(content: Any = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.parametrize(
    "name",
    [
        "request_minimal.json",
        "request_system_multipart.json",
        "request_tools_round_trip.json",
        "request_prompt_cache.json",
    ],
)
def test_fixture_requests_translate_exactly(name: str) -> None:
    case = fixture(name)
    assert to_messages(case["openai"], MODEL) == case["anthropic"]


def test_the_default_max_tokens_is_what_the_router_assumes_for_a_job_without_one() -> None:
    assert RoutingConfig().default_max_tokens == DEFAULT_MAX_TOKENS
    assert to_messages(user(), MODEL)["max_tokens"] == DEFAULT_MAX_TOKENS
    assert to_messages(user(max_tokens=7), MODEL)["max_tokens"] == 7
    both = user(max_tokens=7, max_completion_tokens=9)
    assert to_messages(both, MODEL)["max_tokens"] == 9


def test_one_system_message_is_a_string_and_a_late_one_is_hoisted_too() -> None:
    request = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "b"},
        ]
    }
    body = to_messages(request, MODEL)
    assert body["system"] == "be brief"
    # The two user messages around the hoisted system one are one turn now.
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]


def test_consecutive_assistant_messages_merge_and_empty_ones_vanish() -> None:
    request = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "one"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "q2"},
        ]
    }
    turns = to_messages(request, MODEL)["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]


def test_tool_results_open_their_user_turn_even_after_user_text() -> None:
    request = {
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}}
                ],
            },
            {"role": "user", "content": "also this"},
            {"role": "tool", "tool_call_id": "t1", "content": "done"},
        ]
    }
    turns = to_messages(request, MODEL)["messages"]
    assert turns[1]["content"] == [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]
    assert [b["type"] for b in turns[2]["content"]] == ["tool_result", "text"]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, None, None),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (None, True, None),
    ],
)
def test_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any] | None) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    request = user(tools=tools, tool_choice=choice, parallel_tool_calls=parallel)
    assert to_messages(request, MODEL).get("tool_choice") == expected


def test_without_tools_an_auto_or_none_choice_is_dropped() -> None:
    for choice in ("auto", "none"):
        body = to_messages(user(tool_choice=choice, parallel_tool_calls=False), MODEL)
        assert "tool_choice" not in body and "tools" not in body


def test_stop_lists_and_neutral_values_pass() -> None:
    body = to_messages(
        user(
            stop=["a", "b"],
            n=1,
            logprobs=False,
            presence_penalty=0,
            frequency_penalty=0.0,
            logit_bias={},
            response_format={"type": "text"},
            modalities=["text"],
            stream=False,
            temperature=1,
        ),
        MODEL,
    )
    assert body["stop_sequences"] == ["a", "b"]
    assert body["temperature"] == 1
    assert to_messages(user(stop=[]), MODEL).get("stop_sequences") is None


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (user(n=2), "n > 1"),
        (user(logprobs=True), "logprobs"),
        (user(top_logprobs=3), "top_logprobs"),
        (user(logit_bias={"50256": -100}), "logit_bias"),
        (user(presence_penalty=0.5), "presence_penalty"),
        (user(frequency_penalty=0.5), "frequency_penalty"),
        (user(response_format={"type": "json_object"}), "response_format"),
        (user(response_format={"type": "json_schema", "json_schema": {}}), "response_format"),
        (user(modalities=["text", "audio"]), "modalities"),
        (user(modalities="audio"), "modalities"),
        (user(temperature=1.5), "above 1"),
        (user(stop=7), "stop"),
        (user(audio={"voice": "alloy"}), "audio: not supported"),
        (user(functions=[{"name": "f"}]), "functions: not supported"),
        (user(reasoning_effort="high"), "reasoning_effort: not supported"),
        (
            user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]),
            "'input_audio' part",
        ),
        (user([{"type": "file", "file": {"file_id": "f"}}]), "'file' part"),
        (user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]), "http(s) or data"),
        (
            user([{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}]),
            "base64",
        ),
        (user([{"type": "image_url", "image_url": {"url": "data:image/png,AAAA"}}]), "base64"),
        (user(tools=[{"type": "web_search"}]), "only function tools"),
        (user(tool_choice="required"), "no tools"),
        (user(tool_choice={"type": "allowed_tools"}), "tool_choice"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "'function'"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "'critic'"),
        ({"messages": [{"role": "system", "content": "only"}]}, "first message"),
        (
            {
                "messages": [
                    {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": "x"},
                ]
            },
            "first message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                ]
            },
            "legacy",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "t",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    },
                ]
            },
            "not valid JSON",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "t",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    },
                ]
            },
            "JSON object",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        (
            {
                "messages": [
                    {"role": "system", "content": [{"type": "image_url", "image_url": "x"}]}
                ]
            },
            "'image_url' part",
        ),
    ],
)
def test_untranslatable_requests_are_refused_saying_why(
    request_: dict[str, Any], says: str
) -> None:
    with pytest.raises(Untranslatable, match=None) as caught:
        to_messages(request_, MODEL)
    assert says in str(caught.value)


def test_ignored_keys_change_nothing() -> None:
    plain = to_messages(user(), MODEL)
    extra = user(seed=1, store=True, metadata={"a": "b"}, service_tier="auto", stream=False)
    assert to_messages(extra, MODEL) == plain
