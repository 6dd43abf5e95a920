"""A streamed chat completion as the fleet sends it: the events and their timing.

OpenAI's shape (``chat.completion.chunk`` objects as server-sent events): a
first chunk with ``role``, one content delta per token, a last chunk with
``finish_reason`` and an empty delta, with ``stream_options.include_usage``
one more chunk with ``usage`` and no choices, then ``data: [DONE]``. The
server only writes what :func:`stream_events` and :func:`pace` decide;
nothing here does I/O, so the bytes and the timing of stream #n under a seed
can be tested without a socket.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import orjson

from workers.fleet.plan import Outcome, Plan
from workers.fleet.wire import completion_text

__all__ = ["DONE", "MALFORMED_EVENT", "Pacing", "StreamEvents", "pace", "stream_events"]

DONE = b"data: [DONE]\n\n"
MALFORMED_EVENT = b'data: {"id": "chatcmpl-malformed", "object": "chat.completion.chunk", "cho\n\n'
"""A chunk cut mid-object: a malformed stream sends it after the first, then closes."""

_MARK = "\x00"
"""Stands in for a delta's content while the chunk template is encoded."""


@dataclass(frozen=True, slots=True)
class StreamEvents:
    """The events of one stream, each a complete ``data: ...\\n\\n`` line pair."""

    first: bytes
    """The ``role`` chunk: sent with the first token."""
    tokens: tuple[bytes, ...]
    """One content delta per completion token, in order."""
    last: bytes
    """The ``finish_reason`` chunk, the usage chunk when asked for, ``[DONE]``."""


@dataclass(frozen=True, slots=True)
class Pacing:
    """When a stream's tokens go out and whether it is cut."""

    gaps_s: tuple[float, ...]
    """Seconds between token i and i + 1 (one fewer than the tokens)."""
    cut_after: int | None
    """Tokens sent before the connection is closed, or None for a whole stream."""


def pace(plan: Plan, jitter: float) -> Pacing:
    """The timing and the cut of the stream ``plan`` answers.

    Draws from the stream's own generator (``plan.stream_seed``), always in
    this order: the cut, its place, one factor per gap, so a different cut
    rate never moves the gaps. A cut leaves at least one token unsent and,
    when there are two or more, sends at least one.
    """
    rng = random.Random(plan.stream_seed)
    tokens = plan.completion_tokens
    u_cut = rng.random()
    place = rng.randint(1, tokens - 1) if tokens > 1 else 0
    mean = plan.token_s
    gaps = tuple(mean * (1.0 + jitter * rng.uniform(-1.0, 1.0)) for _ in range(tokens - 1))
    cut = plan.outcome is Outcome.OK and u_cut < plan.stream_cut_rate
    return Pacing(gaps_s=gaps, cut_after=place if cut else None)


def stream_events(
    *,
    endpoint: str,
    seq: int,
    model: str,
    created: int,
    completion_tokens: int,
    finish_reason: str,
    prompt: int,
    usage: bool,
    include_usage: bool,
) -> StreamEvents:
    """The events of a streamed completion; its content, joined, is the text
    the same request gets unstreamed (:func:`workers.fleet.wire.completion_text`).

    ``usage`` False (the plan's ``no_usage_rate``) drops the usage chunk even
    when ``include_usage`` asks for it.
    """
    text = completion_text(endpoint, seq, completion_tokens)
    size, n = len(text), completion_tokens
    pieces = [text[i * size // n : (i + 1) * size // n] for i in range(n)]
    base: dict[str, Any] = {
        "id": f"chatcmpl-{endpoint}-{seq}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": f"fp_fleet_{endpoint}",
    }
    if include_usage:
        base["usage"] = None  # OpenAI's other chunks say null when usage is asked for

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n"

    # One template for every token: encoding a dict per token costs ~5x more.
    head, _, tail = chunk({"content": _MARK}).partition(orjson.dumps(_MARK))
    tokens = tuple(head + orjson.dumps(piece) + tail for piece in pieces)
    last = chunk({}, finish_reason)
    if include_usage and usage:
        counts = {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }
        last += b"data: " + orjson.dumps({**base, "choices": [], "usage": counts}) + b"\n\n"
    return StreamEvents(
        first=chunk({"role": "assistant", "content": "", "refusal": None}),
        tokens=tokens,
        last=last + DONE,
    )
