"""Work sized by its input (embeddings): predictions, reservations and timeouts
count the input, and the latency fit learns a per-input-token slope."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.unit.routing.conftest import spec
from workers.routing import Choice, RoutingConfig, Work

Make = Callable[..., Any]


def embed(tokens: int) -> Work:
    return Work(prompt_tokens=tokens, output_tokens=None, by_input=True)


def test_prediction_grows_with_the_input(make: Make) -> None:
    h = make(["e"])
    # Learn: 1k input tokens take 0.11 s, 9k take 0.19 s (base 0.1 s + 10 µs a token).
    for _ in range(40):
        for tokens, latency in ((1_000, 0.11), (9_000, 0.19)):
            attempt = h.begin("e", embed(tokens), "m")
            h.tick(latency)
            # completion_tokens of an embedding is 0: the input is the size.
            h.router.succeed(attempt, now=h.now, output_tokens=0)
            h.tick(0.01)
    [small] = h.router.explain("m", work=embed(1_000), now=h.now)
    [large] = h.router.explain("m", work=embed(9_000), now=h.now)
    assert small.predicted_s < large.predicted_s
    assert abs(small.predicted_s - 0.11) < 0.03
    assert abs(large.predicted_s - 0.19) < 0.04


def test_no_output_reserved_and_no_typical_output_learned(make: Make) -> None:
    h = make([spec("e", tpm=10_000)])
    attempt = h.begin("e", embed(3_000), "m")
    # A chat job of the same prompt would reserve prompt + default_max_tokens (4096).
    assert attempt.reserved == 3_000
    h.tick(0.1)
    h.router.succeed(attempt, now=h.now, output_tokens=0)
    assert "typical_output={}" in repr(h.router.workload)
    # The tokens came back unused: a job of 7,000 more fits the minute's 10,000.
    choice = h.pick("m", embed(7_000))
    assert isinstance(choice, Choice)


def test_timeout_scales_with_the_input_not_the_default_output(make: Make) -> None:
    config = RoutingConfig(prior_base_s=0.5, prior_per_token_s=0.02)
    h = make(["e"], config=config)
    small = h.router.attempt_timeout("e", work=embed(10), remaining_s=1e6)
    chat = h.router.attempt_timeout("e", work=Work(10, None), remaining_s=1e6)
    assert small < chat  # a chat job is timed for 4,096 output tokens
