"""llmq's gateway as a system of the streaming peers benchmark (bench/stream_peers.py).

What a deployment in front of one fleet is: a private vhost with llmq's
topology, one ``llmq worker`` process with the fleet as its only endpoint,
one ``llmq gateway`` process. A request takes the durable hop (gateway ->
queue -> worker -> fleet, and the answer or the stream's parts back through
the broker), which LiteLLM Proxy does not.

The system's CPU is the gateway's *and* the worker's (``role`` and ``also``
of :class:`bench.open_loop.System`); the benchmark reports each on its own as
well. The broker's CPU is not counted (it is shared with everything else on
the machine, and an HTTP proxy's peer has no such process); the JSON says so.

Settings differing from the shipped ones, all recorded in the result: the
worker may hold ``CONCURRENCY`` jobs at once (256 as shipped: at 2000 requests
a second of 0.2 s answers, 400 are in flight, and the cap rather than the
processes would set the highest rate), the endpoint's cap is 4096 (the
benchmark's harness), and the worker's metrics port is a free one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika

from bench.gateway_overhead import GATEWAY_KEY, free_port, start_gateway
from bench.harness import llmq_config, private_vhost, start_worker, stop_process
from bench.open_loop import System
from schemas.broker.topology import apply_topology
from schemas.settings import TopologySettings
from schemas.topology import plan

NAME = "llmq-gateway"
MODEL = "gpt-4.1-mini"
CONCURRENCY = 1024
FLEET_KEY_ENV = "BENCH_FLEET_KEY"
SETTINGS: dict[str, Any] = {
    "worker_processes": 1,
    "gateway_processes": 1,
    "worker_concurrency": CONCURRENCY,
    "endpoint_max_concurrency": 4096,
    "cpu_counts": "gateway + worker (broker not counted)",
}


@contextlib.contextmanager
def llmq_gateway(fleet_url: str, fleet_key: str) -> Iterator[System]:
    """Start a worker and a gateway for the fleet on a private vhost; yield the
    gateway as a System (not yet ready: the benchmark waits for its first
    answer). Call outside a running event loop (the topology is applied here)."""
    with private_vhost() as amqp_url, tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_topology(amqp_url))
        port = free_port()
        config = _config(Path(tmp) / "llmq.toml", amqp_url, fleet_url, port)
        # Both processes load the config, which names the variable with the
        # fleet's key; they inherit it from here, it is never in the file.
        with _env(FLEET_KEY_ENV, fleet_key):
            worker = start_worker(config, "stream-peers")
            gateway = start_gateway(config, port)
        try:
            yield System(
                NAME,
                f"http://127.0.0.1:{port}/v1",
                GATEWAY_KEY,
                gateway.pid,
                role="gateway",
                also=(("worker", worker.pid),),
            )
        finally:
            for proc in (gateway, worker):
                stop_process(proc)


def _config(path: Path, amqp_url: str, fleet_url: str, port: int) -> Path:
    llmq_config(path, amqp_url, {"paced": fleet_url}, [MODEL], concurrency=CONCURRENCY)
    text = path.read_text()
    # The harness writes endpoints without credentials; this fleet wants its key.
    endpoint = f'base_url = "{fleet_url}"\n'
    text = text.replace(endpoint, f'{endpoint}api_key_env = "{FLEET_KEY_ENV}"\n', 1)
    text += f'[gateway]\nport = {port}\napi_keys_env = "BENCH_GATEWAY_KEYS"\n'
    path.write_text(text)
    return path


async def _topology(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        await apply_topology(connection, plan(TopologySettings()))
    finally:
        await connection.close()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
