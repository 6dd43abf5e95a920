"""Faults survived with nothing lost: every published job ends as a reply, and
every failed one also as a dead letter. Duplicates only where at-least-once
allows them, and counted (see conftest.Ledger)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from harness import (
    Ledger,
    collecting,
    running_fleet,
    start_worker_process,
    write_worker_config,
)

from producers.client import LlmqClient
from schemas.settings import Settings
from workers.deliveries import Deliveries
from workers.service import Worker

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq]

BODY = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}


async def publish(
    amqp_url: str, settings: Settings, ledger: Ledger, n: int, reply_to: str, **kw: Any
) -> None:
    async with LlmqClient(amqp_url, exchange=settings.topology.jobs_exchange) as client:
        ids = [f"{ledger.prefix}-{i}" for i in range(n)]
        ledger.published.update(ids)
        await asyncio.gather(
            *(
                client.submit(
                    kw.pop("body", BODY) if False else BODY, job_id=j, reply_to=reply_to, **kw
                )
                for j in ids
            )
        )


async def settle(ledger: Ledger, timeout: float = 120) -> None:
    """Wait until every job is replied and every failure dead-lettered."""
    async with asyncio.timeout(timeout):
        while not ledger.settled():  # noqa: ASYNC110 - polling the ledger's counts
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let late duplicates arrive, so they are counted


@asynccontextmanager
async def worker_in_process(settings: Settings, **kw: Any) -> AsyncIterator[Worker]:
    worker = Worker(settings, name=f"w-{uuid.uuid4().hex[:4]}", **kw)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(grace_s=5)


async def test_worker_sigkill_with_jobs_in_flight(
    tmp_path: Path,
    amqp_url: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    ledger: Ledger,
) -> None:
    """SIGKILL one of two workers with 120+ jobs in flight"""
    endpoint = {"name": "a", "models": ["m1"], "latency_ms": {"median": 800, "p99": 1200}}
    async with running_fleet(endpoint) as fleet:
        settings = make_settings(fleet)
        queue = f"{names['queue_prefix']}interactive"
        config = write_worker_config(tmp_path / "llmq.toml", amqp_url, names, {"a": fleet.url("a")})
        victim = await start_worker_process(config, connection, queue)
        survivor = await start_worker_process(config, connection, queue)
        try:
            async with collecting(amqp_url, settings, ledger) as replies:
                await publish(amqp_url, settings, ledger, 600, replies)
                # Well into a worker's prefetch in flight (256 here). Not 200: on a
                # slow disk the two workers' waves were seen not to overlap.
                async with asyncio.timeout(30):
                    while fleet.stats()["a"].in_flight < 120:  # noqa: ASYNC110 - polling
                        await asyncio.sleep(0.05)
                victim.send_signal(signal.SIGKILL)
                await settle(ledger)
        finally:
            for proc in (victim, survivor):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 30)
    ledger.check()
    assert all(rs[0]["status"] == "ok" for rs in ledger.replies.values())


async def test_connections_closed_during_load(
    tmp_path: Path,
    amqp_url: str,
    vhost: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    rabbitmqctl: Callable[..., Any],
    ledger: Ledger,
) -> None:
    """rabbitmqctl close_all_connections during load"""
    endpoint = {"name": "a", "models": ["m1"], "latency_ms": {"median": 800, "p99": 1200}}
    async with running_fleet(endpoint) as fleet:
        settings = make_settings(fleet)
        queue = f"{names['queue_prefix']}interactive"
        config = write_worker_config(tmp_path / "llmq.toml", amqp_url, names, {"a": fleet.url("a")})
        worker = await start_worker_process(config, connection, queue)
        try:
            async with collecting(amqp_url, settings, ledger) as replies:
                load = asyncio.create_task(publish(amqp_url, settings, ledger, 500, replies))
                await asyncio.sleep(0.3)
                result = await asyncio.to_thread(
                    rabbitmqctl, "close_all_connections", "--vhost", vhost, "fault suite"
                )
                assert result.returncode == 0, result.stderr
                await load
                await settle(ledger)
        finally:
            worker.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.wait, 30)
    ledger.check()


async def test_broker_restart_during_load(
    tmp_path: Path,
    amqp_url: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    rabbitmqctl: Callable[..., Any],
    ledger: Ledger,
) -> None:
    """rabbitmqctl stop_app / start_app during load"""
    endpoint = {"name": "a", "models": ["m1"], "latency_ms": {"median": 500, "p99": 800}}
    async with running_fleet(endpoint) as fleet:
        settings = make_settings(fleet)
        queue = f"{names['queue_prefix']}interactive"
        config = write_worker_config(tmp_path / "llmq.toml", amqp_url, names, {"a": fleet.url("a")})
        worker = await start_worker_process(config, connection, queue)
        try:
            async with collecting(amqp_url, settings, ledger) as replies:
                await publish(amqp_url, settings, ledger, 400, replies, sla_ms=120_000)
                await asyncio.sleep(0.5)
                try:
                    stopped = await asyncio.to_thread(rabbitmqctl, "stop_app")
                    assert stopped.returncode == 0, stopped.stderr
                    await asyncio.sleep(2)
                finally:
                    started = await asyncio.to_thread(rabbitmqctl, "start_app")
                    assert started.returncode == 0, started.stderr
                await settle(ledger, timeout=180)
        finally:
            worker.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.wait, 60)
    ledger.check()


FAULTS: dict[str, dict[str, Any]] = {
    "hang": {"hang_rate": 1.0},
    "refused": {"down_now": True},
    "5xx_storm": {"error_rate": 1.0, "error_status": 503},
    "429_storm": {"rate_limit_rate": 1.0, "retry_after_s": 2},
    "drip": {"drip_s": 0.5},
    "malformed": {"malformed_rate": 1.0},
    "no_usage": {"no_usage_rate": 1.0},
}


@pytest.mark.parametrize("alone", [False, True], ids=["with_a_healthy_peer", "alone"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_upstream_faults(
    fault: str,
    alone: bool,
    amqp_url: str,
    make_settings: Callable[..., Settings],
    ledger: Ledger,
) -> None:
    """An upstream that hangs, refuses, storms 5xx or 429, drips, is malformed or omits usage"""
    ledger.fault = f"upstream {fault}" + (" (only endpoint)" if alone else " (+ healthy peer)")
    spec = dict(FAULTS[fault])
    down = spec.pop("down_now", False)
    endpoints = [
        {"name": "faulty", "models": ["m1"], "latency_ms": {"median": 20, "p99": 40}, **spec}
    ]
    if not alone:
        endpoints.append(
            {"name": "healthy", "models": ["m1"], "latency_ms": {"median": 50, "p99": 80}}
        )
    async with running_fleet(*endpoints) as fleet:
        if down:
            await fleet.set_down("faulty", True)
        settings = make_settings(fleet)
        async with worker_in_process(settings), collecting(amqp_url, settings, ledger) as replies:
            # A short deadline, so hangs end by it rather than by a long attempt timeout.
            await publish(amqp_url, settings, ledger, 100, replies, sla_ms=3000)
            await settle(ledger, timeout=60)
    ledger.check()
    statuses = [rs[0]["status"] for rs in ledger.replies.values()]
    if fault in ("drip", "no_usage") or not alone:
        assert statuses.count("ok") >= 95, ledger.summary()


async def test_poison_message(
    amqp_url: str,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    ledger: Ledger,
) -> None:
    """A poison message that makes the handler raise every time"""
    original = Deliveries.serve

    async def buggy(self: Deliveries, message: Any) -> Any:
        if (message.message_id or "").endswith("-0"):
            raise RuntimeError("poison")
        return await original(self, message)

    monkeypatch.setattr(Deliveries, "serve", buggy)
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with worker_in_process(settings), collecting(amqp_url, settings, ledger) as replies:
            await publish(amqp_url, settings, ledger, 50, replies)
            await settle(ledger, timeout=60)
    ledger.check()
    poison = ledger.replies[f"{ledger.prefix}-0"][0]
    assert poison["error"]["code"] == "internal_error"
    assert ledger.dead == {f"{ledger.prefix}-0": 1}


async def test_no_delivery_is_held_past_its_deadline(
    amqp_url: str,
    make_settings: Callable[..., Settings],
    ledger: Ledger,
) -> None:
    """Upstreams that hang: every job is answered by its deadline (consumer timeout can't fire)"""
    endpoints = (
        {"name": "hang1", "models": ["m1"], "hang_rate": 1.0},
        {"name": "hang2", "models": ["m1"], "hang_rate": 1.0},
    )
    async with running_fleet(*endpoints) as fleet:
        settings = make_settings(fleet)
        async with worker_in_process(settings), collecting(amqp_url, settings, ledger) as replies:
            started = time.time()
            await publish(amqp_url, settings, ledger, 100, replies, sla_ms=1500)
            await settle(ledger, timeout=30)
            finished = time.time()
    ledger.check()
    # Jobs that got an attempt time out with the deadline; those that waited for a
    # slot (each hanging endpoint takes one probe) end over_capacity at the deadline.
    codes = {rs[0]["error"]["code"] for rs in ledger.replies.values()}
    assert codes <= {"deadline_exceeded", "over_capacity"}
    # Published within ~1 s, deadlines 1.5 s later: all answered well before a minute.
    assert finished - started < 1.5 + 3.0


def _watermark(rabbitmqctl: Callable[..., Any]) -> str:
    got = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    value = got.stdout.strip()
    # A relative watermark prints as a float; anything else: restore the default.
    return value if value.replace(".", "", 1).isdigit() else "0.4"


async def test_memory_alarm(
    amqp_url: str,
    make_settings: Callable[..., Settings],
    rabbitmqctl: Callable[..., Any],
    ledger: Ledger,
) -> None:
    """Broker memory alarm (watermark near 0, then restored)"""
    async with running_fleet(
        {"name": "a", "models": ["m1"], "latency_ms": {"median": 50, "p99": 80}}
    ) as fleet:
        settings = make_settings(fleet)
        async with (
            worker_in_process(settings) as worker,
            collecting(amqp_url, settings, ledger) as replies,
        ):
            await publish(amqp_url, settings, ledger, 200, replies, sla_ms=120_000)
            before = await asyncio.to_thread(_watermark, rabbitmqctl)
            try:
                alarm = await asyncio.to_thread(
                    rabbitmqctl, "set_vm_memory_high_watermark", "0.000001"
                )
                assert alarm.returncode == 0, alarm.stderr
                # Publishers block: a submit does not complete while the alarm is on.
                async with LlmqClient(amqp_url, exchange=settings.topology.jobs_exchange) as client:
                    blocked = asyncio.create_task(
                        client.submit(BODY, job_id=f"{ledger.prefix}-late", reply_to=replies)
                    )
                    ledger.published.add(f"{ledger.prefix}-late")
                    await asyncio.sleep(2)
                    assert not blocked.done()
                    restore = await asyncio.to_thread(
                        rabbitmqctl, "set_vm_memory_high_watermark", "0.4"
                    )
                    assert restore.returncode == 0
                    await asyncio.wait_for(blocked, 60)
            finally:
                await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", before)
            await settle(ledger, timeout=120)
        assert worker.stats.ok >= 200
    ledger.check()


# --- hostile input under load ---------------------------------------------------

GOOD = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
DEEP = (
    b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"x":'
    + b"[" * 300
    + b"1"
    + b"]" * 300
    + b"}"
)


def hostile(settings: Settings, replies: str, now_ms: int) -> list[tuple[str, dict[str, Any]]]:
    """(kind, message properties) of every hostile message this case sends; ``reply_to``
    None means the job must end as a dead letter only."""
    topo = settings.topology
    fat = {f"h{i}": "v" * 1_000 for i in range(110)}
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("unforwardable", {"body": DEEP}),
        ("future_published", {"headers": {"published-ms": now_ms + 3_600_000}}),
        ("huge_deadline", {"headers": {"deadline-ms": 2**53}}),
        ("too_many_n", {"body": orjson.dumps({**GOOD, "n": 100})}),
        ("spoofed_tenant", {"headers": {"tenant": "capped"}}),
        ("fat_headers", {"headers": fat, "body": orjson.dumps({**GOOD, "model": "nope"})}),
        ("reply_to_work_queue", {"reply_to": topo.queue_name("batch")}),
        ("reply_to_dead_queue", {"reply_to": topo.dead_queue}),
        ("reply_to_elsewhere", {"reply_to": "billing.jobs"}),
    ]
    return [(k, {"reply_to": replies, **p}) for k, p in kinds]


async def test_hostile_input_mixed_with_load(
    amqp_url: str,
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    ledger: Ledger,
) -> None:
    """Nine classes of hostile messages (10 each) amid 300 normal jobs, two workers"""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(
            fleet,
            budgets={"tenants": {"capped": {"monthly_usd": 0.000001, "hard_cap": True}}},
        )
        async with (
            worker_in_process(settings) as w1,
            worker_in_process(settings) as w2,
            collecting(amqp_url, settings, ledger) as replies,
        ):
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(settings.topology.jobs_exchange)
            bad: list[tuple[str, str]] = []
            now_ms = int(time.time() * 1000)
            for kind, template in hostile(settings, replies, now_ms) * 10:
                job = f"{ledger.prefix}-{kind}-{uuid.uuid4().hex[:6]}"
                props = dict(template)
                body = props.pop("body", orjson.dumps(GOOD))
                ledger.published.add(job)
                if props["reply_to"] != replies:
                    ledger.dead_only.add(job)
                bad.append((kind, job))
                await exchange.publish(
                    aio_pika.Message(body, message_id=job, **props), routing_key="interactive"
                )
            await publish(amqp_url, settings, ledger, 300, replies)
            await settle(ledger, timeout=90)
            # After the storm: a normal job is answered at once, nothing is held.
            probe = ledger.prefix + "-after"
            ledger.published.add(probe)
            await exchange.publish(
                aio_pika.Message(orjson.dumps(GOOD), message_id=probe, reply_to=replies),
                routing_key="interactive",
            )
            await settle(ledger, timeout=5)
            now = time.monotonic()
            held = [s.in_flight for w in (w1, w2) for s in w.router.snapshot(now=now)]
            reconnects = w1.stats.reconnects + w2.stats.reconnects
            await channel.close()
    ledger.check()
    assert ledger.summary()["duplicates"] == 0
    assert held == [0, 0] and reconnects == 0
    codes: dict[str, set[str | None]] = {}
    for kind, job in bad:
        [first, *_] = ledger.replies.get(job, [{"error": {"code": "(dead letter only)"}}])
        codes.setdefault(kind, set()).add((first.get("error") or {}).get("code"))
    assert codes == {
        "unforwardable": {"invalid_request"},
        "future_published": {"invalid_request"},
        "huge_deadline": {None},  # clamped, then served
        "too_many_n": {"invalid_request"},
        "spoofed_tenant": {None},  # an untrusted claim: billed to no tenant, served
        "fat_headers": {"unknown_model"},
        "reply_to_work_queue": {"(dead letter only)"},
        "reply_to_dead_queue": {"(dead letter only)"},
        "reply_to_elsewhere": {"(dead letter only)"},
    }
