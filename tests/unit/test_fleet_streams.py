"""The fleet's streams without sockets: the request checks, the plan's draws, the
events and their pacing."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import orjson
import pytest

from workers.fleet import Endpoint, plan_request
from workers.fleet.plan import Outcome, Plan, effective
from workers.fleet.stream import DONE, pace, stream_events
from workers.fleet.wire import ChatCall, Refusal, completion_text, parse_chat

MODELS = ("m",)


def endpoint(**fields: Any) -> Endpoint:
    return Endpoint.model_validate({"name": "e", "models": ["m"], **fields})


def chat(**fields: Any) -> ChatCall | Refusal:
    return parse_chat(orjson.dumps({"model": "m", "messages": [{}], **fields}), MODELS)


def events_of(raw: bytes) -> list[Any]:
    """Each ``data:`` event of a fleet stream, JSON-decoded (``[DONE]`` kept as text)."""
    assert raw.endswith(b"\n\n")
    out: list[Any] = []
    for event in raw[:-2].split(b"\n\n"):
        assert event.startswith(b"data: ") and b"\n" not in event
        data = event.removeprefix(b"data: ")
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


def test_stream_and_its_options_are_checked_as_openai_does() -> None:
    """stream is a boolean; stream_options an object, only with stream: true."""
    assert chat() == ChatCall("m", [{}], None, stream=False, include_usage=False)
    assert chat(stream=False, stream_options=None) == chat()
    assert chat(stream=True) == ChatCall("m", [{}], None, stream=True, include_usage=False)
    asked = chat(stream=True, stream_options={"include_usage": True})
    assert isinstance(asked, ChatCall) and asked.include_usage
    assert chat(stream=True, stream_options={}) == chat(stream=True)
    for bad, param in (
        ({"stream": "true"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {}}, "stream_options"),
        ({"stream": True, "stream_options": "usage"}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, None),
    ):
        refusal = chat(**bad)
        assert isinstance(refusal, Refusal), bad
        error = orjson.loads(refusal.body)["error"]
        assert refusal.status == 400 and error["type"] == "invalid_request_error"
        assert param is None or error["param"] == param


def test_a_kind_that_does_not_stream_refuses() -> None:
    """Azure's fake parses with streams=False: stream true is a 400, false passes."""
    body = orjson.dumps({"model": "x", "messages": [{}], "stream": True})
    refusal = parse_chat(body, MODELS, "m", streams=False)
    assert isinstance(refusal, Refusal) and refusal.status == 400
    assert orjson.loads(refusal.body)["error"]["code"] == "unsupported_value"
    quiet = orjson.dumps({"model": "x", "messages": [{}], "stream": False})
    assert isinstance(parse_chat(quiet, MODELS, "m", streams=False), ChatCall)


def test_a_request_that_does_not_stream_takes_the_same_draws() -> None:
    """Four draws as before streams existed; a stream takes one more, a seed of
    its own, and otherwise gets the plan the same request would unstreamed."""
    e = endpoint(latency_ms={"median": 20, "p99": 90}, ms_per_token=3)
    plain, by_hand, streamed = random.Random(5), random.Random(5), random.Random(5)
    p = plan_request(e, plain, 0.0)
    by_hand.random(), by_hand.normalvariate(0.0, 1.0), by_hand.randint(16, 256), by_hand.random()
    assert plain.getstate() == by_hand.getstate()
    assert p.stream_seed is None
    s = plan_request(e, streamed, 0.0, stream=True)
    assert s.stream_seed is not None
    assert (s.completion_tokens, s.delay_s, s.latency_s, s.usage) == (
        p.completion_tokens,
        p.delay_s,
        p.latency_s,
        p.usage,
    )
    assert s.delay_s == pytest.approx(s.latency_s + s.completion_tokens * 0.003)
    assert s.token_s == pytest.approx(0.003)


def test_windows_override_the_cut_rate_and_scale_the_pace() -> None:
    e = endpoint(
        ms_per_token=10,
        stream_cut_rate=0.1,
        windows=[{"start_s": 5, "end_s": 10, "stream_cut_rate": 0.9, "latency_x": 2}],
    )
    assert effective(e, 0).stream_cut_rate == 0.1
    assert effective(e, 6).stream_cut_rate == 0.9
    inside = plan_request(e, random.Random(1), 6.0, stream=True)
    assert inside.stream_cut_rate == 0.9
    assert inside.token_s == pytest.approx(0.02)


def test_events_reassemble_the_unstreamed_text() -> None:
    """Role first, one delta per token that joins to the same text, finish, usage, [DONE]."""
    raw = stream_events(
        endpoint="e",
        seq=3,
        model="m",
        created=7,
        completion_tokens=11,
        finish_reason="length",
        prompt=5,
        usage=True,
        include_usage=True,
    )
    first, *tokens, finish, usage, done = events_of(raw.first + b"".join(raw.tokens) + raw.last)
    assert len(tokens) == 11 == len(raw.tokens)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == completion_text(
        "e", 3, 11
    )
    assert all(t["choices"][0]["finish_reason"] is None for t in [first, *tokens])
    assert finish["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 11, "total_tokens": 16}
    assert done == "[DONE]"
    chunks = [first, *tokens, finish, usage]
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        ("chatcmpl-e-3", "chat.completion.chunk", 7, "m")
    }
    assert all(c["usage"] is None for c in chunks[:-1])  # null on the others, as OpenAI


@pytest.mark.parametrize(("include_usage", "usage"), [(False, True), (True, False)])
def test_no_usage_chunk_unless_asked_and_given(include_usage: bool, usage: bool) -> None:
    """Without include_usage no chunk says usage; no_usage_rate drops even an asked one."""
    raw = stream_events(
        endpoint="e",
        seq=1,
        model="m",
        created=0,
        completion_tokens=1,
        finish_reason="stop",
        prompt=1,
        usage=usage,
        include_usage=include_usage,
    )
    chunks = events_of(raw.first + b"".join(raw.tokens) + raw.last)
    assert chunks[-1] == "[DONE]" and raw.last.endswith(DONE)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c.get("usage") is None for c in chunks[:-1])
    assert ("usage" in chunks[0]) is include_usage


def plan(tokens: int, cut_rate: float, seed: int = 1, outcome: Outcome = Outcome.OK) -> Plan:
    e = endpoint(output_tokens=tokens, ms_per_token=10, stream_cut_rate=cut_rate)
    return replace(plan_request(e, random.Random(seed), 0.0, stream=True), outcome=outcome)


def test_pace_is_jittered_around_the_mean_and_replays() -> None:
    p = plan(200, 0.0)
    pacing = pace(p, 0.25)
    assert len(pacing.gaps_s) == 199 and pacing.cut_after is None
    assert all(0.0075 <= g <= 0.0125 for g in pacing.gaps_s)
    assert len(set(pacing.gaps_s)) > 100  # jittered, not constant
    assert sum(pacing.gaps_s) / 199 == pytest.approx(0.01, rel=0.05)
    assert pace(p, 0.25) == pacing
    assert set(pace(p, 0.0).gaps_s) == {0.01}


def test_a_cut_falls_mid_stream_and_leaves_the_gaps_alone() -> None:
    """Rate 1 always cuts, after at least one token and before the last; rate 0
    never; the gaps do not move with the rate; a malformed stream is not cut."""
    places = set()
    for seed in range(200):
        cut = pace(plan(5, 1.0, seed), 0.25)
        whole = pace(plan(5, 0.0, seed), 0.25)
        assert whole.cut_after is None
        assert cut.gaps_s == whole.gaps_s
        assert cut.cut_after is not None
        places.add(cut.cut_after)
    assert places == {1, 2, 3, 4}
    assert pace(plan(1, 1.0), 0.25).cut_after == 0
    assert pace(plan(5, 1.0, outcome=Outcome.MALFORMED), 0.25).cut_after is None
