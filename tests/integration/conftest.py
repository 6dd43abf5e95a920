"""Fixtures for tests that run a worker against the fake fleet on the real broker.

Each test gets its own exchange and queue names (a fresh prefix) inside the
session's vhost, so tests never see each other's jobs.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from harness import FLEET_KEY

from schemas.settings import Settings, load_settings
from workers.fleet import Fleet


@pytest.fixture
def names() -> dict[str, str]:
    """Unique topology names for one test."""
    p = f"t{uuid.uuid4().hex[:8]}"
    return {
        "jobs_exchange": f"{p}.jobs",
        "dead_exchange": f"{p}.dlx",
        "dead_queue": f"{p}.dead",
        "queue_prefix": f"{p}.q.",
    }


@pytest.fixture
def make_settings(
    amqp_url: str, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """Settings for a worker of this test: endpoints from a running fleet."""
    monkeypatch.setenv("LLMQ_TEST_FLEET_KEY", FLEET_KEY)
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)

    def make(fleet: Fleet, *, models: dict[str, Any] | None = None, **sections: Any) -> Settings:
        endpoints = []
        for name, info in fleet.endpoints.items():
            spec = fleet.scenario.endpoint(name)
            endpoints.append(
                {
                    "name": name,
                    "base_url": info.url,
                    "api_key_env": "LLMQ_TEST_FLEET_KEY",
                    "models": {m: m for m in spec.models},
                    "max_concurrency": 256,
                }
            )
        topology = {**names, "delivery_limit": 3, **sections.pop("topology", {})}
        return load_settings(
            None,
            broker={"url": amqp_url},
            topology=topology,
            endpoints=sections.pop("endpoints", endpoints),
            models=models or {},
            **sections,
        )

    return make


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    conn = await aio_pika.connect(amqp_url)
    yield conn
    await conn.close()
