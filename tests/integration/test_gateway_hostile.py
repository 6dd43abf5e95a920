"""The gateway against callers that do not play fair: slow, many, nosy or posing as others."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp import web
from harness import running_fleet

from producers.gateway import metrics_port, start_gateway
from producers.gateway_server import GatewaySite
from schemas.broker.topology import apply_topology
from schemas.settings import Settings
from schemas.topology import plan

pytestmark = pytest.mark.rabbitmq

KEY = "sk-hostile-test-bare-0123456789"
ACME_KEY = "sk-hostile-test-acme-0123456789"
SECRET = "sk-secret-xyz"
KEYS_ENV = "LLMQ_TEST_HOSTILE_KEYS"
ACME_ENV = "LLMQ_TEST_HOSTILE_ACME"
CHAT = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """Settings with a bare key and a key of tenant ``acme``, from the environment."""
    monkeypatch.setenv(KEYS_ENV, KEY)
    monkeypatch.setenv(ACME_ENV, ACME_KEY)

    def make(fleet: Any, **gateway: Any) -> Settings:
        return make_settings(
            fleet,
            gateway={"api_keys_env": KEYS_ENV, "tenants": {"acme": ACME_ENV}, **gateway},
        )

    return make


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[tuple[web.AppRunner, int]]:
    runner, port = await start_gateway(settings, host="127.0.0.1", port=0)
    try:
        yield runner, port
    finally:
        await runner.cleanup()


def open_connections(runner: web.AppRunner) -> int:
    [site] = [s for s in runner.sites if isinstance(s, GatewaySite)]
    return site.open_connections


async def served(port: int, key: str = KEY) -> tuple[int, int]:
    """The status of /healthz and of an authenticated /v1/models."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
            health = r.status
        async with http.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {key}"}
        ) as r:
            models = r.status
    return health, models


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionError:
        pass
    return received


async def drip(port: int, *, seconds: float) -> tuple[bytes, bool]:
    """Open a connection and drip-feed a request head that never ends.

    Returns what the server sent and whether it closed the connection within
    ``seconds``.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closing = asyncio.create_task(until_closed(reader))
    try:
        async with asyncio.timeout(seconds):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            while not closing.done():
                await asyncio.sleep(0.2)
                writer.write(b"X-Drip: 1\r\n")
                await writer.drain()
    except ConnectionError:
        pass  # the server closed it while we wrote
    except TimeoutError:
        closing.cancel()
        return b"", False
    finally:
        writer.close()
    return await closing, True


async def test_drip_feeding_connections_are_capped_and_dropped(
    settings_for: Callable[..., Settings],
) -> None:
    """200 connections drip-feeding headers: past the cap refused at once, the rest
    dropped at the header timeout; then a normal request is served."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = settings_for(fleet, max_connections=20, header_timeout_s=1.0)
        async with gateway(settings) as (runner, port):
            results = await asyncio.gather(*(drip(port, seconds=15) for _ in range(200)))
            after = await served(port)
            for _ in range(50):
                if open_connections(runner) == 0:
                    break
                await asyncio.sleep(0.1)
            left_open = open_connections(runner)
    assert all(closed for _, closed in results), sum(not c for _, c in results)
    refused = [r for r, _ in results if r.startswith(b"HTTP/1.1 503")]
    assert len(refused) >= 100  # at most 20 at a time were let in
    assert b'"over_capacity"' in refused[0] and b"Retry-After: 1" in refused[0]
    assert after == (200, 200)
    assert left_open == 0


async def test_idle_and_slow_kept_alive_connections_are_closed(
    settings_for: Callable[..., Settings],
) -> None:
    """After an answer: closed when idle past idle_timeout_s, and when the next request's
    head takes longer than header_timeout_s (long before the idle timeout)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    outcomes = []
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        for limits, next_head in (
            ({"header_timeout_s": 1.0, "idle_timeout_s": 1.5}, b""),
            ({"header_timeout_s": 1.0, "idle_timeout_s": 60.0}, b"GET /healthz HTTP/1.1\r\n"),
        ):
            async with gateway(settings_for(fleet, **limits)) as (_, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                first = await reader.readuntil(b'{"status": "ok"}')
                writer.write(next_head)
                loop = asyncio.get_running_loop()
                start = loop.time()
                async with asyncio.timeout(10):
                    rest = await until_closed(reader)
                outcomes.append((first.startswith(b"HTTP/1.1 200"), rest, loop.time() - start))
                writer.close()
    (ok_idle, rest_idle, idle_s), (ok_slow, rest_slow, slow_s) = outcomes
    assert ok_idle and ok_slow and rest_idle == rest_slow == b""
    assert idle_s >= 1.0  # the idle timeout, not something sooner
    assert slow_s < 10  # the header timeout: the idle one is 60 s


async def test_a_body_that_does_not_arrive_gets_408(
    settings_for: Callable[..., Settings],
) -> None:
    """Headers promise 1000 bytes, 10 arrive: 408 request_timeout and the connection closes."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = settings_for(fleet, body_timeout_s=1.0)
        async with gateway(settings) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {KEY}\r\n".encode()
                + b"Content-Length: 1000\r\n\r\n"
                + b'{"model": '
            )
            async with asyncio.timeout(10):
                answer = await until_closed(reader)
            writer.close()
            after = await served(port)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"request_timeout"' in answer
    assert after == (200, 200)


async def test_no_key_reaches_the_logs(
    settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    """Keys in query strings and in malformed request lines are never logged."""
    caplog.set_level(logging.DEBUG)
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        async with gateway(settings_for(fleet)) as (_, port):
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as http:
                for url in (
                    f"{base}/v1/models?api_key={SECRET}",
                    f"{base}/healthz?key={SECRET}&x=1",
                    f"{base}/nope?token={SECRET}",
                ):
                    async with http.get(url, headers={"Authorization": f"Bearer {KEY}"}) as r:
                        await r.read()
            for raw in (
                f"GET /v1/models?api_key={SECRET} HTTP/1.1 junk\r\n\r\n",
                f"GET /v1/models?api_key={SECRET} HTTP/1.1\r\nBad Header\r\n\r\n",
                f"G\x01T /v1/models?api_key={SECRET} HTTP/1.1\r\n\r\n",
                f"GET /v1/models?api_key={SECRET}&pad={'a' * 9000} HTTP/1.1\r\n\r\n",
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw.encode())
                async with asyncio.timeout(10):
                    await until_closed(reader)
                writer.close()
    access = [r for r in caplog.records if "/v1/models" in r.getMessage()]
    assert access, "no access line was logged at all"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        assert SECRET not in repr(vars(record))
    assert SECRET not in caplog.text


async def test_metrics_are_not_served_to_callers(
    settings_for: Callable[..., Settings],
) -> None:
    """/metrics is 404 on the callers' port, key or not; it is on gateway.metrics_port."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        async with gateway(settings_for(fleet, metrics_port=0)) as (runner, port):
            scrape_port = metrics_port(runner)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                    anonymous = r.status
                auth = {"Authorization": f"Bearer {KEY}"}
                async with http.get(f"http://127.0.0.1:{port}/metrics", headers=auth) as r:
                    with_key = r.status
                assert scrape_port is not None and scrape_port != port
                async with http.get(f"http://127.0.0.1:{scrape_port}/metrics") as r:
                    scraped = (r.status, await r.text())
        async with gateway(settings_for(fleet)) as (runner, port):
            off = metrics_port(runner)
    assert (anonymous, with_key) == (404, 404)
    assert scraped[0] == 200 and "llmq_gateway_requests_total" in scraped[1]
    assert off is None


class FakeWorker:
    """Consumes the gateway's jobs and answers each at once, remembering what came."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel
        self.jobs: list[tuple[str | None, Any]] = []

    async def on_job(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            self.jobs.append((message.message_id, (message.headers or {}).get("tenant")))
            reply = {
                "schema_version": 1,
                "job_id": message.message_id,
                "status": "ok",
                "response": {"object": "chat.completion", "n": len(self.jobs)},
                "error": None,
            }
            await self.channel.default_exchange.publish(
                aio_pika.Message(orjson.dumps(reply), correlation_id=message.correlation_id),
                routing_key=message.reply_to or "",
            )


@asynccontextmanager
async def fake_worker(
    settings: Settings, connection: aio_pika.abc.AbstractConnection
) -> AsyncIterator[FakeWorker]:
    await apply_topology(connection, plan(settings.topology))
    channel = await connection.channel()
    worker = FakeWorker(channel)
    queue = await channel.get_queue(settings.topology.queue_name("interactive"))
    tag = await queue.consume(worker.on_job)
    try:
        yield worker
    finally:
        await queue.cancel(tag)
        await channel.close()


async def complete(port: int, key: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=CHAT,
            headers={"Authorization": f"Bearer {key}", **headers},
        ) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.json()


async def test_the_tenant_is_the_keys_not_the_callers_claim(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """X-LLMQ-Tenant is ignored: acme's key bills acme, a bare key no one; unless trusted."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = settings_for(fleet)
        claim = {"X-LLMQ-Tenant": "globex"}
        async with fake_worker(settings, connection) as worker:
            async with gateway(settings) as (_, port):
                acme = await complete(port, ACME_KEY, **claim)
                bare = await complete(port, KEY, **claim)
            async with gateway(settings_for(fleet, trust_tenant_header=True)) as (_, port):
                trusted = await complete(port, KEY, **claim)
                unclaimed = await complete(port, ACME_KEY)
    assert [a[0] for a in (acme, bare, trusted, unclaimed)] == [200] * 4
    assert [tenant for _, tenant in worker.jobs] == ["acme", None, "globex", "acme"]


async def test_request_ids_are_scoped_to_the_key(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """The same X-Request-Id from two keys is two jobs; a retry with the same key is one."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = settings_for(fleet)
        rid = {"X-Request-Id": "shared-request-1"}
        async with fake_worker(settings, connection) as worker:
            async with gateway(settings) as (_, port):
                first = await complete(port, KEY, **rid)
                retry = await complete(port, KEY, **rid)
                other = await complete(port, ACME_KEY, **rid)
    (mine, again, theirs) = (job_id for job_id, _ in worker.jobs)
    assert mine == again != theirs
    assert not str(theirs).endswith(str(mine))
    for status, headers, _ in (first, retry, other):
        assert status == 200 and headers["x-request-id"] == "shared-request-1"
    assert first[1]["x-llmq-job-id"] == mine and other[1]["x-llmq-job-id"] == theirs
