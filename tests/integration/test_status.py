"""State gossip between workers, shared ejections, and ``llmq status``."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aiohttp import web
from harness import FLEET_KEY, chat, queue_depth, running_fleet, write_worker_config
from ops_helpers import eventually

from llmq_cli.status import snapshot
from schemas.broker.topology import apply_topology
from schemas.settings import Settings
from schemas.topology import plan
from workers.routing import RoutingConfig
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]


def state_of(worker: Worker, endpoint: str) -> str:
    [status] = [s for s in worker.router.snapshot(now=time.monotonic()) if s.name == endpoint]
    return status.state


async def publish(
    connection: aio_pika.abc.AbstractConnection,
    settings: Settings,
    body: bytes,
    *,
    reply_to: str,
    job_id: str | None = None,
) -> str:
    job_id = job_id or uuid.uuid4().hex
    channel = await connection.channel()
    try:
        exchange = await channel.get_exchange(settings.topology.jobs_exchange)
        await exchange.publish(
            aio_pika.Message(body, message_id=job_id, reply_to=reply_to),
            routing_key="interactive",
        )
    finally:
        await channel.close()
    return job_id


async def test_an_endpoint_one_worker_ejects_is_avoided_by_the_other_within_a_second(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """Worker A sees "bad" fail and ejects it; B, which never called it, avoids it too."""
    state = {"state_exchange": f"state.{uuid.uuid4().hex[:8]}"}
    other = f"t{uuid.uuid4().hex[:8]}"
    b_names = {
        "jobs_exchange": f"{other}.jobs",
        "dead_exchange": f"{other}.dlx",
        "dead_queue": f"{other}.dead",
        "queue_prefix": f"{other}.q.",
    }
    async with running_fleet(
        {"name": "good", "models": ["m1"], "latency_ms": 5},
        {"name": "bad", "models": ["m1"], "error_rate": 1.0},
    ) as fleet:
        # Two workers on the same state exchange but their own job queues: only A gets jobs.
        a_settings = make_settings(fleet, topology=state, metrics={"enabled": False})
        b_settings = make_settings(fleet, topology={**state, **b_names}, metrics={"enabled": False})
        a = Worker(a_settings, name="worker-a", routing=RoutingConfig(eject_after=1))
        b = Worker(b_settings, name="worker-b")
        await b.start()
        await a.start()
        channel = await connection.channel()
        replies = await channel.declare_queue(f"r.{uuid.uuid4().hex}", exclusive=True)
        try:
            ejected_at = None
            for _ in range(20):  # cold endpoints are tried first: "bad" is tried soon
                await publish(connection, a_settings, orjson.dumps(chat()), reply_to=replies.name)
                async with asyncio.timeout(5):
                    while (await replies.get(fail=False, no_ack=True)) is None:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
                if state_of(a, "bad") == "open":
                    ejected_at = time.monotonic()
                    break
            assert ejected_at is not None, "worker A never ejected the failing endpoint"
            assert state_of(b, "bad") == "closed"
            await eventually(lambda: state_of(b, "bad") == "open", timeout=2.0)
            seen_after = time.monotonic() - ejected_at
            assert all(s.attempts == 0 for s in b.router.snapshot(now=time.monotonic()))
            fleet.reset()
            b_jobs = [
                await publish(connection, b_settings, orjson.dumps(chat()), reply_to=replies.name)
                for _ in range(10)
            ]
            await eventually(lambda: b.stats.ok == len(b_jobs), timeout=10)
            stats = fleet.stats()
        finally:
            await channel.close()
            await a.stop(grace_s=5)
            await b.stop(grace_s=5)
    assert seen_after < 2.0, seen_after  # one interval (1 s ± 10 %) plus delivery
    assert stats["bad"].requests == 0 and stats["good"].requests == 10


async def run_status(config: Path, *args: str) -> tuple[int, bytes, bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmq_cli",
        "status",
        "--config",
        str(config),
        *args,
        cwd=ROOT,
        env={**env, "LLMQ_TEST_FLEET_KEY": FLEET_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_status_shows_two_workers_endpoints_queues_and_dead_letters(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    amqp_url: str,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """``llmq status --once --json`` (and the table) on two running workers."""
    state = {"state_exchange": f"state.{uuid.uuid4().hex[:8]}"}
    async with running_fleet(
        {"name": "a", "models": ["m1"], "latency_ms": 5},
        {"name": "b", "models": ["m1"], "latency_ms": 5},
    ) as fleet:
        settings = make_settings(
            fleet,
            topology=state,
            worker={"state_interval_s": 0.2},
            metrics={"enabled": False},
            budgets={"tenants": {"acme": {"monthly_usd": 50}}},
        )
        config = write_worker_config(
            tmp_path / "llmq.toml",
            amqp_url,
            {**names, **state},
            {name: info.url for name, info in fleet.endpoints.items()},
            state_interval_s=0.2,
        )
        with config.open("a") as f:
            f.write("[budgets.tenants.acme]\nmonthly_usd = 50\n")
        workers = [Worker(settings, name=f"status-{i}") for i in range(2)]
        for w in workers:
            await w.start()
        channel = await connection.channel()
        replies = await channel.declare_queue(f"r.{uuid.uuid4().hex}", exclusive=True)
        try:
            for _ in range(10):
                await publish(connection, settings, orjson.dumps(chat()), reply_to=replies.name)
            await publish(connection, settings, b"not json", reply_to=replies.name)
            await eventually(lambda: sum(w.stats.ok for w in workers) == 10, timeout=10)
            dead = settings.topology.dead_queue
            async with asyncio.timeout(10):
                while await queue_depth(connection, dead) < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            code, out, err = await run_status(config, "--once", "--json")
            table_code, table, _ = await run_status(config, "--once", "--listen", "0.5")
        finally:
            await channel.close()
            for w in workers:
                await w.stop(grace_s=5)
    assert code == 0, err.decode()
    doc = orjson.loads(out)
    assert sorted(w["worker"] for w in doc["workers"]) == ["status-0", "status-1"]
    assert sum(w["ok"] for w in doc["workers"]) == 10
    assert sum(w["errors"] for w in doc["workers"]) == 1
    endpoints = {e["name"]: e for e in doc["endpoints"]}
    assert set(endpoints) == {"a", "b"}
    for e in endpoints.values():
        assert set(e["by_worker"]) == {"status-0", "status-1"}
        assert e["state"] == "closed" and e["in_flight"] == 0
    assert sum(e["share"] for e in endpoints.values()) == pytest.approx(1.0, abs=0.01)
    queues = {q["class"]: q for q in doc["queues"]}
    assert queues["interactive"]["ready"] == 0 and queues["interactive"]["consumers"] == 2
    assert doc["dead_letters"] == 1
    assert doc["queue_age"].startswith("unavailable")
    assert doc["budgets"] == [
        {
            "scope": "tenant",
            "name": "acme",
            "month": time.strftime("%Y-%m", time.gmtime()),
            "spent_usd": 0.0,
            "limit_usd": 50.0,
            "fraction": 0.0,
            "hard_cap": False,
        }
    ]
    assert table_code == 0
    text = table.decode()
    for word in ("Queues", "Workers (2)", "status-0", "Endpoints", "dead letters: 1"):
        assert word in text, text


async def test_status_reads_queue_ages_from_the_management_api(
    make_settings: Callable[..., Settings], amqp_url: str, vhost: str
) -> None:
    """With broker.management_url, the oldest job's age comes from /api/queues."""
    seen: dict[str, Any] = {}

    async def queues(request: web.Request) -> web.Response:
        seen["vhost"] = request.match_info["vhost"]
        seen["auth"] = request.headers.get("Authorization")
        interactive = seen["settings"].topology.queue_name("interactive")
        return web.json_response(
            [
                {
                    "name": interactive,
                    "messages_ready": 3,
                    "messages_unacknowledged": 2,
                    "head_message_timestamp": int(time.time()) - 42,
                },
                {"name": seen["settings"].topology.queue_name("batch"), "messages_ready": 0},
                {"name": "someone-else", "messages_ready": 1},
            ]
        )

    app = web.Application()
    app.router.add_get("/api/queues/{vhost}", queues)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
            base = make_settings(fleet)
            broker = base.broker.model_copy(update={"management_url": f"http://127.0.0.1:{port}/"})
            settings = base.model_copy(update={"broker": broker})
            seen["settings"] = settings
            conn = await aio_pika.connect(amqp_url)
            await apply_topology(conn, plan(settings.topology))
            await conn.close()
            doc = await snapshot(settings, listen_s=0)
    finally:
        await runner.cleanup()
    assert seen["vhost"] == vhost
    assert seen["auth"] == "Basic " + base64.b64encode(b"guest:guest").decode()
    queues_by_class = {q["class"]: q for q in doc["queues"]}
    interactive = queues_by_class["interactive"]
    assert interactive["unacked"] == 2
    assert 41 <= interactive["oldest_age_s"] <= 45
    assert queues_by_class["batch"]["oldest_age_s"] == 0.0  # empty queue: no age
    assert doc["queue_age"] == "management"
    assert doc["workers"] == [] and doc["notes"] == ["no worker heard on 'llmq.state'"]


MGMT_SECRET = "s3cret-mgmt-pw"
AMQP_SECRET = "s3cret-amqp-pw"


def status_config(path: Path, amqp_url: str, names: dict[str, str], management: str) -> Path:
    lines = ["[broker]", f'url = "{amqp_url}"', f'management_url = "{management}"', "[topology]"]
    lines += [f'{k} = "{v}"' for k, v in names.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_status_never_prints_a_password(
    amqp_url: str, names: dict[str, str], tmp_path: Path
) -> None:
    """A management URL with a password, unreachable or refusing: the password is
    in neither the JSON nor the table, and the URL's own credentials are the ones sent."""
    seen: list[str | None] = []

    async def refuse(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=401)

    app = web.Application()
    app.router.add_get("/api/queues/{vhost}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    outputs = []
    try:
        for management in (
            f"http://admin:{MGMT_SECRET}@127.0.0.1:1/",  # nothing listens on port 1
            f"http://admin:{MGMT_SECRET}@127.0.0.1:{port}/",
        ):
            config = status_config(tmp_path / "llmq.toml", amqp_url, names, management)
            for args in (("--json",), ("--once",)):
                code, out, err = await run_status(config, *args, "--listen", "0")
                outputs.append((code, out.decode() + err.decode()))
    finally:
        await runner.cleanup()
    for code, text in outputs:
        assert code == 0, text
        assert MGMT_SECRET not in text, text
    unreachable, refused = orjson.loads(outputs[0][1])["notes"], orjson.loads(outputs[2][1])
    assert any("admin:***@127.0.0.1:1" in n for n in unreachable), unreachable
    assert any("HTTP 401" in n for n in refused["notes"]), refused
    assert seen and seen[0] == "Basic " + base64.b64encode(f"admin:{MGMT_SECRET}".encode()).decode()


async def test_status_hides_the_broker_password_when_refused(
    amqp_url: str, names: dict[str, str], tmp_path: Path
) -> None:
    """A wrong AMQP password: status says it cannot reach the broker, without the password."""
    wrong = amqp_url.replace("guest:guest@", f"guest:{AMQP_SECRET}@")
    config = status_config(tmp_path / "llmq.toml", wrong, names, "http://127.0.0.1:1/")
    code, out, err = await run_status(config, "--json", "--listen", "0")
    assert code == 1
    assert "cannot reach the broker" in err.decode()
    assert AMQP_SECRET not in out.decode() + err.decode()
