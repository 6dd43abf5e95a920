"""A node lost under load (issue 14 item 4): two TCP proxies in front of the test
broker are two nodes with their own addresses (tests/tcpproxy.py); killing one
resets every connection through it and refuses new ones. Workers, LlmqClient
and the commands must carry on through the other, and a publish whose
confirm was lost must be sent again with its job id, never reported as sent
without one."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import orjson
import pytest
from harness import FLEET_KEY, chat, queue_depth, running_fleet
from tcpproxy import TcpProxy

from producers.client import LlmqClient
from schemas.broker.topology import apply_topology
from schemas.settings import BrokerSettings, Settings, load_settings
from schemas.topology import plan
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def two_nodes(amqp_url: str) -> AsyncIterator[tuple[TcpProxy, TcpProxy]]:
    """Nodes A and B, both up, in front of the broker of ``amqp_url``."""
    broker = urlsplit(amqp_url)
    target = (broker.hostname or "127.0.0.1", broker.port or 5672)
    a, b = TcpProxy(*target), TcpProxy(*target)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.kill()
        await b.kill()


def on_nodes(settings: Settings, amqp_url: str, *nodes: TcpProxy) -> Settings:
    """``settings`` with the nodes' addresses as ``broker.urls``."""
    broker = BrokerSettings.model_validate({"urls": [n.url(amqp_url) for n in nodes]})
    return settings.model_copy(update={"broker": broker})


def count_publishes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every ``basic.publish`` sent, by message id (a job's is its job id)."""
    sent: Counter[str] = Counter()
    original = aiormq.Channel.basic_publish

    async def counting(self: aiormq.Channel, body: bytes, **kwargs: Any) -> Any:
        properties = kwargs.get("properties")
        sent[getattr(properties, "message_id", None) or ""] += 1
        return await original(self, body, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "basic_publish", counting)
    return sent


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def test_worker_and_client_move_to_the_live_node_under_load(
    make_settings: Callable[..., Settings],
    amqp_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Everything connected through A (B was down then); A dies while jobs are being
    published and answered: the worker and the client come back through B, every
    call gets its answer, and each job is confirmed once (re-sends keep the job id)."""
    sent = count_publishes(monkeypatch)
    slow = {"name": "a", "models": ["m1"], "latency_ms": {"median": 150, "p99": 300}}
    async with running_fleet(slow) as fleet, two_nodes(amqp_url) as (a, b):
        await b.kill()  # B refuses while everyone connects: all of it goes through A
        settings = on_nodes(make_settings(fleet), amqp_url, a, b)
        worker = Worker(settings, name="w")
        await worker.start()
        replies: Counter[str] = Counter()
        confirmed: Counter[str] = Counter()
        on_reply = LlmqClient._on_reply

        async def counting_reply(
            self: LlmqClient, message: aio_pika.abc.AbstractIncomingMessage
        ) -> None:
            replies[message.correlation_id or "?"] += 1
            await on_reply(self, message)

        monkeypatch.setattr(LlmqClient, "_on_reply", counting_reply)
        try:
            async with LlmqClient(
                settings.broker.addresses,
                exchange=settings.topology.jobs_exchange,
                default_sla_ms=60_000,
            ) as client:
                publish = client._publish

                async def counting_publish(message: aio_pika.Message, routing_key: str) -> None:
                    await publish(message, routing_key)  # returns once confirmed
                    confirmed[message.message_id or "?"] += 1

                client._publish = counting_publish  # type: ignore[method-assign]
                await b.start()
                on_a = a.open_connections

                async def call(i: int) -> dict[str, Any]:
                    return await client.call(chat(), job_id=f"job-{i}", timeout_s=60)

                tasks = []
                for i in range(150):
                    tasks.append(asyncio.create_task(call(i)))
                    if i == 60:
                        await a.kill()  # jobs in flight, publishes unconfirmed
                    await asyncio.sleep(0.01)
                answers = await asyncio.wait_for(asyncio.gather(*tasks), 90)
                on_b = b.open_connections
        finally:
            await worker.stop(grace_s=5)
    jobs = {f"job-{i}" for i in range(150)}
    assert on_a == 3, "worker (2) and client (1) all went through A"
    assert on_b == 3, "and all came back through B"
    assert worker.stats.reconnects >= 1
    assert all(r["status"] == "ok" for r in answers), [r for r in answers if r["status"] != "ok"]
    assert set(replies) == jobs  # no reply to anything but our jobs
    resent = {j: n for j, n in sent.items() if j in jobs and n > 1}
    assert confirmed == Counter(dict.fromkeys(jobs, 1))  # each job confirmed once
    # Duplicates (a re-sent job, a redelivered one) carry the job id; the client keeps
    # the first reply of each. How many there are depends on the timing of the cut.
    assert all(replies[j] >= 1 for j in jobs), (len(resent), replies)


async def test_a_publish_whose_confirm_was_lost_is_sent_again_with_its_job_id(
    names: dict[str, str],
    amqp_url: str,
    connection: aio_pika.abc.AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker has the job but its confirm never reaches the client when A dies:
    ``submit`` does not return until the job is sent again through B with the same
    job id and that copy is confirmed; the queue then holds two copies of one job."""
    settings = load_settings(None, topology=names)
    await apply_topology(connection, plan(settings.topology))
    queue = settings.topology.queue_name("interactive")
    sent = count_publishes(monkeypatch)
    # Bounded: without failover the client waits for A forever, even to close.
    async with two_nodes(amqp_url) as (a, b), asyncio.timeout(60):
        await b.kill()
        async with LlmqClient(
            [a.url(amqp_url), b.url(amqp_url)], exchange=settings.topology.jobs_exchange
        ) as client:
            await b.start()
            a.hold()  # the broker's answers stop at A
            submit = asyncio.create_task(client.submit(chat(), job_id="held-1"))

            async def arrived() -> bool:
                return await queue_depth(connection, queue) == 1

            await until(arrived)  # the broker has it; its confirm is held
            await asyncio.sleep(0.2)
            assert not submit.done(), "reported as sent without a confirm"
            await a.kill()
            assert await asyncio.wait_for(submit, 30) == "held-1"
            assert b.open_connections == 1
    channel = await connection.channel()
    copies = []
    while (message := await (await channel.get_queue(queue)).get(fail=False)) is not None:
        copies.append(message.message_id)
        await message.ack()
    assert copies == ["held-1", "held-1"]
    assert sent["held-1"] == 2


def write_config(path: Path, urls: list[str], names: dict[str, str]) -> Path:
    lines = ["[broker]", f"urls = {orjson.dumps(urls).decode()}", "[topology]"]
    lines += [f'{k} = "{v}"' for k, v in names.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


async def llmq(config: Path, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmq_cli",
        *args,
        "--config",
        str(config),
        cwd=ROOT,
        env={**env, "LLMQ_TEST_FLEET_KEY": FLEET_KEY},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_commands_skip_a_dead_first_address(
    names: dict[str, str],
    amqp_url: str,
    connection: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> None:
    """``llmq status`` and ``llmq dlq list`` with the first node dead answer through
    the second; with both dead they say so, naming each node, never the password."""
    settings = load_settings(None, topology=names)
    await apply_topology(connection, plan(settings.topology))
    async with two_nodes(amqp_url) as (dead, live):
        await dead.kill()
        urls = [dead.url(amqp_url), live.url(amqp_url)]
        config = write_config(tmp_path / "llmq.toml", urls, names)
        code, out = await llmq(config, "status", "--json", "--listen", "0")
        assert code == 0, out
        assert "queues" in orjson.loads(out[out.index("{") :])
        code, out = await llmq(config, "dlq", "list", "--json")
        assert code == 0, out
        assert orjson.loads(out[out.index("[") :]) == []
        assert live.accepted >= 2  # both went through the second node
        await live.kill()
        for args in (("status", "--json", "--listen", "0"), ("dlq", "list")):
            code, out = await llmq(config, *args)
            assert code == 1, out
            assert f"127.0.0.1:{dead.port}" in out and f"127.0.0.1:{live.port}" in out, out
            assert "guest:guest" not in out


async def test_a_node_that_accepts_and_says_nothing_does_not_hold_a_connect(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged node (TCP accepted, no AMQP answer) ends the attempt at the
    handshake timeout; the next attempt reaches the live node."""
    from schemas.broker import connection as broker_connection

    monkeypatch.setattr(broker_connection, "_HANDSHAKE_TIMEOUT_S", 1.0, raising=False)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep it open, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    live = urlsplit(amqp_url)
    wedged = live._replace(netloc=f"{live.username}:{live.password}@127.0.0.1:{port}").geturl()
    try:
        async with asyncio.timeout(15):
            command = await broker_connection.open_connection([wedged, amqp_url], name="t")
            await command.close()
            worker = await broker_connection.connect(f"{wedged},{amqp_url}", name="t")
            await worker.close()
        assert accepted, "the wedged node was tried"
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_leaving_the_client_while_no_node_answers_does_not_hang(amqp_url: str) -> None:
    """The node stops answering (its bytes held): ``async with LlmqClient`` still
    ends, each cleanup step bounded, instead of waiting for answers that never come."""
    async with two_nodes(amqp_url) as (a, b):
        client = LlmqClient([a.url(amqp_url), b.url(amqp_url)])
        await client.__aenter__()
        a.hold()
        b.hold()
        async with asyncio.timeout(30):  # 3 steps of at most 5 s each, plus slack
            await client.__aexit__(None, None, None)
