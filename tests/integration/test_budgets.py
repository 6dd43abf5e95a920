"""Monthly budgets on the real broker: alerts, the hard cap, spend shared by workers."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import aio_pika
import pytest
from harness import Caller, chat, running_fleet
from ops_helpers import eventually, get, priced, value

from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq


def spent(worker: Worker, key: str = "model:m1") -> float:
    return worker.telemetry.spend_limits.ledger.spent(key)


async def test_alerts_fire_once_per_threshold_and_the_hard_cap_stops_calls(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10 USD jobs on a 100 USD capped budget: 3 alerts, then over_budget without a call.

    The jobs say max_tokens=10: a hard cap reserves a job's worst case, and without
    a cap that is ``default_max_tokens`` (4,096 tokens, 4,096 USD here)."""
    async with running_fleet({"name": "a", "models": ["m1"], "output_tokens": 10}) as fleet:
        settings = make_settings(
            fleet,
            endpoints=priced(fleet),  # 1 USD per completion token: 10 USD a job
            budgets={
                "models": {"m1": {"monthly_usd": 100, "hard_cap": True}},
                "tenants": {"acme": {"monthly_usd": 10_000}},
            },
            metrics={"port": 0},
            # The tenant header is believed only from broker users the operator names.
            tenancy={"trust_header_from": ["guest"]},
        )
        worker = Worker(settings, name="budget-worker")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        caplog.set_level(logging.WARNING, logger="llmq.worker")
        try:
            ids: list[str] = []
            for _ in range(10):
                ids.append(
                    await caller.publish(
                        chat(max_tokens=10), headers={"tenant": "acme"}, user_id="guest"
                    )
                )
                await caller.wait_for(lambda: ids[-1] in caller.replies)
            assert fleet.stats()["a"].requests == 10
            over = await caller.publish(
                chat(max_tokens=10), headers={"tenant": "acme"}, user_id="guest"
            )
            await caller.wait_for(lambda: over in caller.replies and len(caller.dead) == 1)
            requests = fleet.stats()["a"].requests
            assert worker.metrics_port is not None
            _, text = await get(worker.metrics_port, "/metrics")
        finally:
            await worker.stop(grace_s=5)
    assert [caller.replies[j][0]["routing"]["cost_usd"] for j in ids] == [10.0] * 10
    [reply] = caller.replies[over]
    assert reply["error"]["code"] == "over_budget" and reply["error"]["retriable"] is False
    assert caller.dead[0].message_id == over
    assert caller.dead[0].headers["error-code"] == "over_budget"
    assert requests == 10  # the capped job never reached the upstream
    alerts = [r for r in caplog.records if getattr(r, "budget", None) == "m1"]
    assert [r.threshold for r in alerts] == [0.5, 0.75, 0.9]  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING for r in alerts)
    for threshold in ("0.5", "0.75", "0.9"):
        labels = {"scope": "model", "name": "m1", "threshold": threshold}
        assert value(text, "llmq_budget_alerts_total", **labels) == 1
    assert value(text, "llmq_budget_spent_usd", scope="model", name="m1") == 100
    assert value(text, "llmq_budget_spent_usd", scope="tenant", name="acme") == 100
    assert value(text, "llmq_budget_limit_usd", scope="model", name="m1") == 100


async def test_two_workers_share_spend_without_double_counting(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """Each worker's view of the month is the true total, not twice it; a late joiner learns it."""
    p = uuid.uuid4().hex[:8]
    async with running_fleet(
        {"name": "a", "models": ["m1"], "output_tokens": 10, "latency_ms": 20}
    ) as fleet:
        settings = make_settings(
            fleet,
            endpoints=priced(fleet),
            budgets={"models": {"m1": {"monthly_usd": 1_000_000}}},
            # Its own state and spend stream: the module's first test spent on m1 too.
            topology={"state_exchange": f"state.{p}", "spend_stream": f"spend.{p}"},
            worker={"state_interval_s": 0.2},
            metrics={"enabled": False},
        )
        workers = [Worker(settings, name=f"spender-{i}") for i in range(2)]
        for w in workers:
            await w.start()
        caller = Caller(connection, settings)
        await caller.start()
        late: Worker | None = None
        try:
            ids = [await caller.publish(chat()) for _ in range(40)]
            await caller.wait_for(lambda: set(ids) <= set(caller.replies))
            true_total = sum(caller.replies[j][0]["routing"]["cost_usd"] for j in ids)
            assert all(w.stats.ok > 0 for w in workers), [w.stats.ok for w in workers]
            await eventually(lambda: all(spent(w) == pytest.approx(true_total) for w in workers))
            await asyncio.sleep(0.5)  # a few more rounds of gossip change nothing
            views = [spent(w) for w in workers]
            late = Worker(settings, name="late-joiner")
            await late.start()
            await eventually(lambda: spent(late) == pytest.approx(true_total))
        finally:
            for w in [*workers, *([late] if late else [])]:
                await w.stop(grace_s=5)
    assert true_total == 400
    assert views == [pytest.approx(400), pytest.approx(400)]
