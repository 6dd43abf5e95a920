"""Helpers for the observability tests (metrics, budgets, status, probe)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from workers.fleet import Fleet


def priced(fleet: Fleet, output_per_mtok: float = 1e6, **extra: Any) -> list[dict[str, Any]]:
    """The fleet's endpoints with a price: by default 1 USD per completion token."""
    return [
        {
            "name": name,
            "base_url": info.url,
            "api_key_env": "LLMQ_TEST_FLEET_KEY",
            "models": list(info.models),
            "max_concurrency": 256,
            "output_per_mtok": output_per_mtok,
            **extra,
        }
        for name, info in fleet.endpoints.items()
    ]


async def get(port: int, path: str) -> tuple[int, str]:
    """GET ``http://127.0.0.1:<port><path>``: status and text."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}") as response:
            return response.status, await response.text()


def value(text: str, metric: str, /, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric and s.labels == labels:
                return float(s.value)
    return 0.0


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll ``predicate`` every 50 ms until true; TimeoutError after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - state no event announces
            await asyncio.sleep(0.05)
