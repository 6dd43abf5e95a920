"""Metrics, probes, logs and trace context of a running worker (and the gateway)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from functools import partial

import aio_pika
import orjson
import pytest
from harness import Caller, chat, running_fleet
from harness import started as started_worker
from ops_helpers import eventually, get, priced, value
from prometheus_client.parser import text_string_to_metric_families

from producers.gateway import metrics_port, start_gateway
from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# Every family a worker exports, whether or not it has samples yet.
WORKER_FAMILIES = {
    "llmq_jobs": "counter",
    "llmq_dead_letters": "counter",
    "llmq_queue_wait_seconds": "histogram",
    "llmq_job_duration_seconds": "histogram",
    "llmq_upstream_duration_seconds": "histogram",
    "llmq_retries": "counter",
    "llmq_hedges": "counter",
    "llmq_retry_budget_exhausted": "counter",
    "llmq_tokens": "counter",
    "llmq_cost_usd": "counter",
    "llmq_budget_alerts": "counter",
    "llmq_endpoint_in_flight": "gauge",
    "llmq_endpoint_capacity": "gauge",
    "llmq_endpoint_cost_score_seconds": "gauge",
    "llmq_endpoint_failure_rate": "gauge",
    "llmq_endpoint_circuit_state": "gauge",
    "llmq_endpoint_ejections": "counter",
    "llmq_jobs_in_flight": "gauge",
    "llmq_jobs_requeued": "counter",
    "llmq_jobs_duplicate": "counter",
    "llmq_broker_reconnects": "counter",
    "llmq_retry_budget_balance": "gauge",
    "llmq_state_peers": "gauge",
    "llmq_event_loop_lag_seconds": "gauge",
    "llmq_budget_spent_usd": "gauge",
    "llmq_budget_limit_usd": "gauge",
}


started = partial(started_worker, name="metrics-worker")


async def test_metrics_show_every_family_after_jobs(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """GET /metrics after jobs: every series family, with the jobs' labels."""
    async with running_fleet(
        {"name": "good", "models": ["m1"], "output_tokens": 10},
        {"name": "broken", "models": ["m1"], "error_rate": 1.0},
    ) as fleet:
        settings = make_settings(
            fleet,
            endpoints=priced(fleet),
            metrics={"port": 0, "max_tenants": 1},
            worker={"max_body_bytes": 2048},
            tenancy={"trust_header_from": ["*"]},  # tenants as the jobs claim them
        )
        async with started(settings, connection) as (worker, caller):
            assert worker.metrics_port
            ids = []
            for i in range(6):  # sequential: "broken" gets tried (cold first), then avoided
                ids.append(await caller.publish(chat(), headers={"tenant": f"t{i % 2}"}))
                await caller.wait_for(lambda: ids[-1] in caller.replies)
            bad = await caller.publish(b"not json")
            await caller.wait_for(lambda: bad in caller.replies and len(caller.dead) == 1)
            status, text = await get(worker.metrics_port, "/metrics")
            health = await get(worker.metrics_port, "/healthz")
            ready = await get(worker.metrics_port, "/readyz")
    assert status == 200
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert {k: families.get(k) for k in WORKER_FAMILIES} == WORKER_FAMILIES
    assert value(text, "llmq_jobs_total", outcome="ok", code="none") == 6
    assert value(text, "llmq_jobs_total", outcome="error", code="invalid_request") == 1
    assert value(text, "llmq_dead_letters_total", code="invalid_request") == 1
    assert value(text, "llmq_queue_wait_seconds_count", sla_class="interactive") == 6
    assert value(text, "llmq_upstream_duration_seconds_count", endpoint="good", outcome="ok") == 6
    assert (
        value(
            text, "llmq_upstream_duration_seconds_count", endpoint="broken", outcome="server_error"
        )
        >= 1
    )
    assert value(text, "llmq_retries_total", endpoint="good", after="server_error") >= 1
    # max_tenants=1: the first tenant keeps its name, the second is "(other)".
    completion = {
        t: value(
            text, "llmq_tokens_total", model="m1", endpoint="good", tenant=t, kind="completion"
        )
        for t in ("t0", "(other)")
    }
    assert completion == {"t0": 30, "(other)": 30}
    assert value(text, "llmq_cost_usd_total", model="m1", endpoint="good", tenant="t0") == 30
    assert value(text, "llmq_endpoint_circuit_state", endpoint="good", state="closed") == 1
    assert value(text, "llmq_endpoint_cost_score_seconds", endpoint="good") > 0
    assert value(text, "llmq_endpoint_in_flight", endpoint="good") == 0
    assert health[0] == 200 and orjson.loads(health[1])["status"] == "ok"
    assert ready[0] == 200 and orjson.loads(ready[1])["status"] == "ready"
    assert "llmq_jobs_created" not in text  # no *_created series


async def test_readyz_fails_while_draining(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """During shutdown /readyz answers 503 (no new traffic) while /healthz stays 200."""
    async with running_fleet(
        {"name": "slow", "models": ["m1"], "latency_ms": {"median": 800, "p99": 800}}
    ) as fleet:
        settings = make_settings(fleet, metrics={"port": 0})
        worker = Worker(settings, name="draining")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        job = await caller.publish(chat())
        await eventually(lambda: worker.stats.in_flight > 0)
        assert worker.metrics_port is not None
        port = worker.metrics_port
        stopping = asyncio.create_task(worker.stop(grace_s=5))
        await asyncio.sleep(0.1)
        ready = await get(port, "/readyz")
        health = await get(port, "/healthz")
        await stopping
        await caller.wait_for(lambda: job in caller.replies)
    assert ready[0] == 503 and orjson.loads(ready[1])["stopping"] is True
    assert health[0] == 200


async def test_reply_carries_traceparent_and_errors_are_logged(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reply has the job's traceparent header; an error is one structured log line."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(
            fleet, metrics={"enabled": False}, tenancy={"trust_header_from": ["*"]}
        )
        async with started(settings, connection) as (worker, _):
            assert worker.metrics_port is None
            channel = await connection.channel()
            queue = await channel.declare_queue(f"tp.{uuid.uuid4().hex}", exclusive=True)
            replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
            await queue.consume(replies.put, no_ack=True)
            exchange = await channel.get_exchange(settings.topology.jobs_exchange)
            caplog.set_level(logging.INFO, logger="llmq.worker")
            for body, job_id in ((chat(), "traced-ok"), (chat(model="nope"), "traced-bad")):
                await exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(body),
                        message_id=job_id,
                        reply_to=queue.name,
                        headers={"traceparent": TRACEPARENT, "tenant": "acme"},
                    ),
                    routing_key="interactive",
                )
            got = {}
            async with asyncio.timeout(10):
                while len(got) < 2:
                    message = await replies.get()
                    got[message.correlation_id] = message
            await channel.close()
    assert {k: m.headers.get("traceparent") for k, m in got.items()} == {
        "traced-ok": TRACEPARENT,
        "traced-bad": TRACEPARENT,
    }
    lines = [r for r in caplog.records if getattr(r, "job_id", None) in ("traced-ok", "traced-bad")]
    # The ok job logs at debug only; the error once, at info (the caller's mistake).
    [line] = lines
    assert line.levelno == logging.INFO
    assert (line.job_id, line.code, line.attempts, line.tenant) == (  # type: ignore[attr-defined]
        "traced-bad",
        "unknown_model",
        0,
        "acme",
    )
    assert hasattr(line, "model") and hasattr(line, "endpoint")


async def test_gateway_serves_metrics(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's /metrics (on its metrics port) counts requests by route and status,
    with a latency histogram."""
    monkeypatch.delenv("LLMQ_GATEWAY_KEYS", raising=False)
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet, gateway={"require_auth": False, "metrics_port": 0})
        runner, port = await start_gateway(settings, host="127.0.0.1", port=0)
        try:
            for path in ("/healthz", "/healthz", "/nope"):
                await get(port, path)
            scrape_port = metrics_port(runner)
            assert scrape_port is not None
            status, text = await get(scrape_port, "/metrics")
        finally:
            await runner.cleanup()
    assert status == 200
    assert value(text, "llmq_gateway_requests_total", route="/healthz", status="200") == 2
    assert value(text, "llmq_gateway_requests_total", route="unmatched", status="404") == 1
    assert value(text, "llmq_gateway_request_duration_seconds_count", route="/healthz") == 2
    assert "llmq_gateway_in_flight" in text
