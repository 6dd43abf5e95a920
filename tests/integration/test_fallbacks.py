"""Fallbacks on the real broker and the fake fleet: a busy model is waited for,
not replaced by its fallback; ``overflow_to`` says when it may be (issue 13)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from harness import chat, running_fleet, started

from schemas.settings import Settings
from workers.fleet import Fleet

pytestmark = pytest.mark.rabbitmq

JOBS = 6
SLOW_MS = 150


def settings_for(
    make_settings: Callable[..., Settings], fleet: Fleet, rules: dict[str, Any]
) -> Settings:
    """m1 on one slow endpoint with one slot; m2, its fallback, on a fast one."""
    key = {"api_key_env": "LLMQ_TEST_FLEET_KEY"}
    return make_settings(
        fleet,
        endpoints=[
            {"name": "big", "base_url": fleet.url("big"), "models": ["m1"], "max_concurrency": 1}
            | key,
            {"name": "small", "base_url": fleet.url("small"), "models": ["m2"]} | key,
        ],
        models={"m1": {"fallbacks": ["m2"], **rules}},
        topology={
            "state_exchange": f"t{uuid.uuid4().hex[:8]}.state",  # this worker alone: all slots
            "classes": {"interactive": {"default_sla_ms": 30_000, "hedge": False}},
        },
    )


FLEET = (
    {"name": "big", "models": ["m1"], "latency_ms": SLOW_MS},
    {"name": "small", "models": ["m2"], "latency_ms": 5},
)


async def burst(caller: Any) -> list[dict[str, Any]]:
    """JOBS jobs for m1 published at once; their replies' routing blocks."""
    ids = [await caller.publish(chat("m1")) for _ in range(JOBS)]
    await caller.wait_for(lambda: all(i in caller.replies for i in ids), timeout=30)
    replies = [caller.replies[i][0] for i in ids]
    assert [r["status"] for r in replies] == ["ok"] * JOBS, replies
    return [r["routing"] for r in replies]


async def test_a_busy_model_is_waited_for_not_served_by_its_fallback(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(*FLEET) as fleet:
        async with started(settings_for(make_settings, fleet, {}), connection) as (_, caller):
            routing = await burst(caller)
            stats = fleet.stats()
    assert {(r["model"], r["endpoint"]) for r in routing} == {("m1", "big")}
    assert all("via" not in r for r in routing)
    assert stats["small"].requests == 0
    assert stats["big"].requests == JOBS


async def test_overflow_to_serves_a_busy_model_and_the_reply_says_so(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(*FLEET) as fleet:
        settings = settings_for(make_settings, fleet, {"overflow_to": ["m2"]})
        async with started(settings, connection) as (_, caller):
            routing = await burst(caller)
    served = [(r["model"], r["endpoint"], r.get("via")) for r in routing]
    assert ("m1", "big", None) in served  # the first takes the one slot
    spilled = [s for s in served if s[0] == "m2"]
    assert spilled and all(s == ("m2", "small", "overflow") for s in spilled), served
    assert set(served) <= {("m1", "big", None), ("m2", "small", "overflow")}
