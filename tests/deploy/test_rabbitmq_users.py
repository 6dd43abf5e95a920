"""deploy/rabbitmq/definitions.json on the real broker: each user can do its job and no more.

The file is imported with ``rabbitmqctl import_definitions`` into a private
vhost, its users renamed with a unique suffix (same passwords, permissions
and topic permissions), and removed again afterwards. Then the real code
runs as those users: ``LlmqClient`` (what the gateway uses) as the
producer and as the gateway, a ``Worker`` with ``--no-declare`` as the worker,
and the dead-letter moves of ``llmq dlq`` as the operator; and each user is
shown to be refused what it must not do (``ACCESS_REFUSED``), and the producer
to be unable to publish in the gateway's name.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
from harness import FLEET_KEY, chat, running_fleet

from producers.client import LlmqClient
from schemas.settings import Settings, TopologySettings, load_settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"
HOST = os.environ.get("LLMQ_TEST_BROKER_HOST", "127.0.0.1")
TOPO = TopologySettings()
WORK_QUEUES = [TOPO.queue_name(c) for c in sorted(TOPO.classes)]
DEAD = TOPO.dead_queue


def _ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _delete(command: str, name: str) -> None:
    """Delete a user or vhost, retrying while the broker restarts (other suites
    restart it on purpose); gone already is fine."""
    for _ in range(15):
        done = _ctl(command, name)
        if done.returncode == 0 or "not exist" in done.stderr or "no_such" in done.stderr:
            return
        time.sleep(2)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"RabbitMQ is required in CI: {reason}")
    pytest.skip(f"no RabbitMQ: {reason}")


@dataclass(frozen=True)
class Deployed:
    """definitions.json as imported: a private vhost, users renamed."""

    vhost: str
    users: dict[str, str]
    """Role (the file's user name) → the name on the broker."""
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        user, password = self.users[role], self.passwords[role]
        return f"amqp://{user}:{password}@{HOST}:5672/{quote(self.vhost, safe='')}"


def _private_copy(definitions: dict[str, Any], vhost: str, suffix: str) -> dict[str, Any]:
    """The same document in ``vhost``, every user renamed ``<name>-<suffix>``."""
    doc = json.loads(json.dumps(definitions))
    renamed = {u["name"]: f"{u['name']}-{suffix}" for u in doc["users"]}
    for user in doc["users"]:
        user["name"] = renamed[user["name"]]
    for key in ("permissions", "topic_permissions"):
        for entry in doc.get(key, []):
            entry["user"] = renamed[entry["user"]]
            entry["vhost"] = vhost
    doc["vhosts"] = [{"name": vhost}]
    for key in ("exchanges", "queues", "bindings", "policies", "parameters"):
        for entry in doc.get(key, []):
            entry["vhost"] = vhost
    return doc


@pytest.fixture(scope="module")
def deployed(render_definitions: ModuleType) -> Iterator[Deployed]:
    """definitions.json imported once for this module; deleted (users and vhost) after."""
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl is not installed")
    reachable = _ctl("list_vhosts")
    if reachable.returncode != 0:
        _unavailable(reachable.stderr.strip() or "rabbitmqctl list_vhosts failed")
    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    vhost = f"llmq-deploy-{suffix}"
    definitions = json.loads(DEFINITIONS.read_text())
    users = {u["name"]: f"{u['name']}-{suffix}" for u in definitions["users"]}
    passwords = {r.name: r.dev_password for r in render_definitions.roles()}
    # rabbitmqctl may run as the rabbitmq user (Debian's wrapper does `su`), and
    # 3.10's `import_definitions -` (stdin) is refused: a world-readable file it is.
    with tempfile.TemporaryDirectory(prefix="llmq-deploy-") as tmp:
        os.chmod(tmp, 0o755)  # dev password hashes, a throwaway vhost
        path = Path(tmp) / "definitions.json"
        path.write_text(json.dumps(_private_copy(definitions, vhost, suffix)))
        path.chmod(0o644)
        imported = _ctl("import_definitions", str(path))
    try:
        assert imported.returncode == 0, f"import_definitions failed: {imported.stderr}"
        yield Deployed(vhost, users, passwords)
    finally:
        for name in users.values():
            _delete("delete_user", name)
        _delete("delete_vhost", vhost)


@pytest.fixture(autouse=True)
async def empty_queues(deployed: Deployed) -> None:
    """Each test starts with the vhost's queues empty."""
    async with connected(deployed, "llmq-admin") as admin:
        channel = await admin.channel()
        for queue in [*WORK_QUEUES, DEAD]:
            await (await channel.get_queue(queue, ensure=False)).purge()


@asynccontextmanager
async def connected(
    deployed: Deployed, role: str
) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(deployed.url(role))
    try:
        yield connection
    finally:
        await connection.close()


async def refused(connection: aio_pika.abc.AbstractConnection, action: Any) -> str:
    """Run ``action(channel)`` on a fresh channel; return the broker's refusal text."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    try:
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as info:
            await action(channel)
    finally:
        if not channel.is_closed:
            await channel.close()
    text = str(info.value)
    assert "ACCESS_REFUSED" in text
    return text


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


def consume(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        q = await channel.get_queue(queue, ensure=False)
        await q.consume(_ignore, no_ack=False)

    return action


def get(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        q = await channel.get_queue(queue, ensure=False)
        await q.get(fail=False)

    return action


def publish(exchange: str, routing_key: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        await target.publish(aio_pika.Message(b"{}", message_id="x"), routing_key=routing_key)

    return action


def declare(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

    return action


def purge(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        q = await channel.get_queue(queue, ensure=False)
        await q.purge()

    return action


def delete(queue: str) -> Any:
    async def action(channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.queue_delete(queue)

    return action


async def depth(deployed: Deployed, queue: str) -> int:
    async with connected(deployed, "llmq-admin") as admin:
        channel = await admin.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count)


async def wait_depth(deployed: Deployed, queue: str, expected: int) -> None:
    for _ in range(100):
        if await depth(deployed, queue) == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{queue} holds {await depth(deployed, queue)}, not {expected}")


def test_every_user_logs_in_with_its_documented_dev_password(deployed: Deployed) -> None:
    for role, name in deployed.users.items():
        checked = _ctl("authenticate_user", name, deployed.passwords[role])
        assert checked.returncode == 0, (role, checked.stderr)
    wrong = _ctl("authenticate_user", deployed.users["llmq-worker"], "guest")
    assert wrong.returncode != 0


@pytest.mark.parametrize("role", ["llmq-producer", "llmq-gateway"])
async def test_producer_publishes_jobs_and_reads_only_its_replies(
    deployed: Deployed, role: str
) -> None:
    """The gateway's user is a producer with a name of its own: no more rights."""
    # The real client: declares and consumes its own reply queue, publishes to llmq.jobs.
    async with LlmqClient(deployed.url(role), exchange=TOPO.jobs_exchange) as client:
        await client.submit(chat(), sla_class="interactive")
        await client.submit(chat(), sla_class="batch")
        reply_queue = client.reply_queue
    await wait_depth(deployed, TOPO.queue_name("interactive"), 1)
    await wait_depth(deployed, TOPO.queue_name("batch"), 1)

    async with connected(deployed, role) as conn:
        # The point: a producer can neither take jobs nor read dead letters.
        for queue in [*WORK_QUEUES, DEAD]:
            assert f"access to queue '{queue}'" in await refused(conn, consume(queue))
            await refused(conn, get(queue))
            await refused(conn, purge(queue))
            await refused(conn, delete(queue))
        # Jobs go through llmq.jobs with an SLA class as key, nowhere else.
        await refused(conn, publish("", WORK_QUEUES[0]))  # straight into a work queue
        await refused(conn, publish(TOPO.dead_exchange, ""))  # forge a dead letter
        text = await refused(conn, publish(TOPO.jobs_exchange, "job.elsewhere"))
        assert "topic" in text or "routing key" in text
        await refused(conn, declare("llmq.q.extra"))  # no new queues but reply queues
    assert reply_queue.startswith("llmq.reply.")
    # Nothing the producer tried moved a job.
    assert await depth(deployed, TOPO.queue_name("interactive")) == 1


async def test_only_the_gateway_publishes_in_the_gateways_name(deployed: Deployed) -> None:
    """Workers believe the tenant header of jobs whose user_id is the gateway's: the
    broker lets only the gateway's user send that user_id."""
    interactive = TOPO.queue_name("interactive")
    gateway = deployed.users["llmq-gateway"]
    async with LlmqClient(deployed.url("llmq-gateway"), exchange=TOPO.jobs_exchange) as client:
        await client.submit(chat(), sla_class="interactive", tenant="acme")
    await wait_depth(deployed, interactive, 1)
    async with connected(deployed, "llmq-admin") as admin:
        channel = await admin.channel()
        queue = await channel.get_queue(interactive, ensure=False)
        job = await queue.get(fail=True, no_ack=True, timeout=5)
    assert job is not None and job.user_id == gateway
    assert (job.headers or {}).get("tenant") == "acme"

    # A producer claiming to be the gateway: RabbitMQ closes the channel (406).
    async with connected(deployed, "llmq-producer") as conn:
        channel = await conn.channel(publisher_confirms=True)
        jobs = await channel.get_exchange(TOPO.jobs_exchange, ensure=False)
        forged = aio_pika.Message(
            b"{}", message_id="forged", user_id=gateway, headers={"tenant": "acme"}
        )
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="user_id"):
            await jobs.publish(forged, routing_key="interactive")
    assert await depth(deployed, interactive) == 0


def _worker_settings(deployed: Deployed, base_url: str) -> Settings:
    sections: dict[str, Any] = {}
    if "metrics" in Settings.model_fields:
        sections["metrics"] = {"port": 0}
    return load_settings(
        None,
        broker={"url": deployed.url("llmq-worker")},
        endpoints=[
            {
                "name": "up",
                "base_url": base_url,
                "api_key_env": "LLMQ_TEST_FLEET_KEY",
                "models": ["m1"],
            }
        ],
        **sections,
    )


async def test_worker_serves_jobs_replies_and_dead_letters_with_only_its_permissions(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMQ_TEST_FLEET_KEY", FLEET_KEY)
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)
    async with running_fleet({"name": "up", "models": ["m1"]}) as fleet:
        worker = Worker(_worker_settings(deployed, fleet.url("up")), declare_topology=False)
        await worker.start()
        try:
            # Its own state queue, bound to the state exchange: the shared view works.
            telemetry = getattr(worker, "telemetry", None)
            assert getattr(telemetry, "sharing", True) is True
            async with LlmqClient(deployed.url("llmq-producer")) as client:
                ok = await client.call(chat("m1"), timeout_s=20)
                failed = await client.call(chat("no-such-model"), timeout_s=20)
        finally:
            await worker.stop(grace_s=5)
    # A reply through the default exchange, a dead letter through llmq.dlx.
    assert ok["status"] == "ok", ok
    assert failed["status"] == "error" and failed["error"]["code"] == "unknown_model", failed
    await wait_depth(deployed, DEAD, 1)

    async with connected(deployed, "llmq-worker") as conn:
        await refused(conn, consume(DEAD))  # dead letters are the operator's
        await refused(conn, publish(TOPO.jobs_exchange, "interactive"))  # no job injection
        await refused(conn, declare("llmq.q.extra"))  # topology is not the worker's
        # (read on the work queues also lets it purge them: RabbitMQ's read is
        # consume, get and purge together.)
        await refused(conn, delete(WORK_QUEUES[0]))


async def test_worker_keeps_spend_in_the_stream_with_only_its_permissions(
    deployed: Deployed, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """llmq-worker writes its spend snapshots to llmq.spend (through amq.default) and a
    worker started later reads them back: the month survives a restart."""
    monkeypatch.setenv("LLMQ_TEST_FLEET_KEY", FLEET_KEY)
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)
    async with running_fleet({"name": "up", "models": ["m1"], "output_tokens": 10}) as fleet:
        settings = load_settings(
            None,
            broker={"url": deployed.url("llmq-worker")},
            endpoints=[
                {
                    "name": "up",
                    "base_url": fleet.url("up"),
                    "api_key_env": "LLMQ_TEST_FLEET_KEY",
                    "models": ["m1"],
                    "output_per_mtok": 1e6,  # 10 USD a job
                }
            ],
            budgets={"models": {"m1": {"monthly_usd": 1000}}},
            metrics={"enabled": False},
        )
        spent = []
        for _ in range(2):
            worker = Worker(settings, declare_topology=False)
            await worker.start()
            try:
                async with LlmqClient(deployed.url("llmq-producer")) as client:
                    ok = await client.call(chat("m1", max_tokens=10), timeout_s=20)
                    assert ok["status"] == "ok", ok
                spent.append(worker.telemetry.spend_limits.ledger.spent("model:m1"))
            finally:
                await worker.stop(grace_s=5)
    assert spent == [10, 20]  # the second worker started knowing the first one's 10 USD
    assert not [r for r in caplog.records if "spend stream" in r.getMessage()]


async def test_operator_replays_dead_letters_and_touches_nothing_else(
    deployed: Deployed,
) -> None:
    async with connected(deployed, "llmq-admin") as admin:
        channel = await admin.channel(publisher_confirms=True)
        dlx = await channel.get_exchange(TOPO.dead_exchange, ensure=False)
        await dlx.publish(
            aio_pika.Message(b'{"model":"m1"}', message_id="dead-1"), routing_key="batch"
        )
    await wait_depth(deployed, DEAD, 1)

    # What `llmq dlq replay` does: passive declare, consume, republish to llmq.jobs, ack.
    async with connected(deployed, "llmq-operator") as conn:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        dead = await channel.declare_queue(DEAD, passive=True)
        message = await dead.get(fail=True, no_ack=False, timeout=5)
        assert message is not None and message.message_id == "dead-1"
        jobs = await channel.get_exchange(TOPO.jobs_exchange, ensure=False)
        await jobs.publish(
            aio_pika.Message(message.body, message_id=message.message_id),
            routing_key="batch",
            mandatory=True,
        )
        await message.ack()
        await channel.close()

        for queue in WORK_QUEUES:
            await refused(conn, consume(queue))
        await refused(conn, publish("", WORK_QUEUES[0]))
        await refused(conn, publish(TOPO.dead_exchange, ""))
        await refused(conn, publish(TOPO.jobs_exchange, "job.elsewhere"))
        await refused(conn, declare("llmq.q.extra"))
        await refused(conn, delete(DEAD))
    await wait_depth(deployed, TOPO.queue_name("batch"), 1)
    assert await depth(deployed, DEAD) == 0


async def test_monitor_sees_no_messages(deployed: Deployed) -> None:
    async with connected(deployed, "llmq-monitor") as conn:
        for queue in [*WORK_QUEUES, DEAD]:
            await refused(conn, consume(queue))
        await refused(conn, publish(TOPO.jobs_exchange, "interactive"))
        await refused(conn, declare("llmq.reply.x"))
