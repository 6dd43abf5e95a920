"""The fake fleet over real HTTP on loopback: every behaviour a router will meet."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from workers.fleet import Fleet, Scenario, load_scenario
from workers.fleet.command import fleet_command

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}


def fleet(*endpoints: dict[str, Any], seed: int = 0, api_key: str | None = KEY) -> Fleet:
    """A fleet on free ports; endpoints default to one model "m"."""
    scenario = Scenario.model_validate(
        {"api_key": api_key, "endpoints": [{"models": ["m"], **e} for e in endpoints]}
    )
    return Fleet(scenario, seed=seed)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        yield session


async def chat(
    client: aiohttp.ClientSession, base: str, body: dict[str, Any] | None = None, **kw: Any
) -> tuple[int, dict[str, str], bytes, float]:
    """POST a completion; return status, headers, body and seconds taken."""
    start = time.perf_counter()
    async with client.post(f"{base}/chat/completions", json=body or CHAT, **kw) as response:
        raw = await response.read()
        return response.status, dict(response.headers), raw, time.perf_counter() - start


def stats_url(base: str) -> str:
    return base.removesuffix("/v1") + "/fleet/stats"


async def test_success_shape(client: aiohttp.ClientSession) -> None:
    """A chat.completion with usage, the endpoint's name in a header."""
    async with fleet({"name": "a", "output_tokens": 12}) as f:
        status, headers, raw, _ = await chat(client, f.url("a"))
    assert status == 200
    assert headers["x-fleet-endpoint"] == "a"
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    assert body["id"] == "chatcmpl-a-1"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("a #1: ")
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}


async def test_latency_and_per_token_time(client: aiohttp.ClientSession) -> None:
    """Time to answer = latency + tokens * ms_per_token, capped by max_tokens."""
    async with fleet(
        {"name": "slow", "latency_ms": 100},
        {"name": "tok", "ms_per_token": 5, "output_tokens": 40},
    ) as f:
        slow = [await chat(client, f.url("slow")) for _ in range(3)]
        _, _, raw, long = await chat(client, f.url("tok"))
        _, _, capped_raw, short = await chat(client, f.url("tok"), {**CHAT, "max_tokens": 4})
    assert all(0.095 <= s[3] < 0.25 for s in slow)
    assert 0.195 <= long < 0.4
    assert json.loads(raw)["usage"]["completion_tokens"] == 40
    assert 0.018 <= short < 0.15
    capped = json.loads(capped_raw)
    assert capped["usage"]["completion_tokens"] == 4
    assert capped["choices"][0]["finish_reason"] == "length"


async def test_server_errors(client: aiohttp.ClientSession) -> None:
    """error_rate answers the configured 5xx with OpenAI's error shape, after the latency."""
    async with fleet({"name": "e", "error_rate": 1.0, "error_status": 503, "latency_ms": 50}) as f:
        status, _, raw, took = await chat(client, f.url("e"))
    assert status == 503
    assert json.loads(raw)["error"]["type"] == "server_error"
    assert took >= 0.045


async def test_rate_limit(client: aiohttp.ClientSession) -> None:
    """rate_limit_rate answers 429 at once, with Retry-After."""
    async with fleet(
        {"name": "r", "rate_limit_rate": 1.0, "retry_after_s": 1.5, "latency_ms": 500}
    ) as f:
        status, headers, raw, took = await chat(client, f.url("r"))
    assert status == 429
    assert headers["Retry-After"] == "2"
    assert headers["retry-after-ms"] == "1500"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    assert took < 0.2


async def test_hang_until_client_gives_up(client: aiohttp.ClientSession) -> None:
    """A hang never answers; the client's timeout fires and the slot is freed."""
    async with fleet({"name": "h", "hang_rate": 1.0}) as f:
        with pytest.raises(asyncio.TimeoutError):
            await chat(client, f.url("h"), timeout=aiohttp.ClientTimeout(total=0.3))
        for _ in range(100):
            if f.stats()["h"].in_flight == 0:
                break
            await asyncio.sleep(0.01)
        stats = f.stats()["h"]
    assert (stats.hangs, stats.in_flight, stats.max_in_flight) == (1, 0, 1)
    assert stats.by_status == {}


async def test_hang_cap_drops_the_connection(client: aiohttp.ClientSession) -> None:
    """After hang_max_s the connection is closed without an answer."""
    async with fleet({"name": "h", "hang_rate": 1.0, "hang_max_s": 0.2}) as f:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await chat(client, f.url("h"))


async def test_capacity_queue(client: aiohttp.ClientSession) -> None:
    """Beyond capacity, requests wait for a slot: 6 requests, 2 slots, 3 waves."""
    async with fleet({"name": "q", "capacity": 2, "latency_ms": 150}) as f:
        start = time.perf_counter()
        pending = asyncio.gather(*(chat(client, f.url("q")) for _ in range(6)))
        await asyncio.sleep(0.075)
        during = f.stats()["q"]
        results = await pending
        took = time.perf_counter() - start
        stats = f.stats()["q"]
    assert (during.in_flight, during.queued) == (2, 4)
    assert [r[0] for r in results] == [200] * 6
    assert 0.44 <= took < 0.8
    assert stats.max_in_flight == 2


async def test_capacity_429(client: aiohttp.ClientSession) -> None:
    """With over_capacity = "429", requests beyond capacity are refused at once."""
    async with fleet({"name": "c", "capacity": 2, "over_capacity": "429", "latency_ms": 150}) as f:
        results = await asyncio.gather(*(chat(client, f.url("c")) for _ in range(5)))
        stats = f.stats()["c"]
    assert sorted(r[0] for r in results) == [200, 200, 429, 429, 429]
    assert all("Retry-After" in r[1] for r in results if r[0] == 429)
    assert stats.outcomes["over_capacity"] == 3


async def test_taken_port_fails_fast() -> None:
    """A fixed port already in use is an OSError at start, not a silent retry."""
    async with fleet({"name": "a"}) as first:
        taken = first.endpoints["a"].port
        second = fleet({"name": "b", "port": taken})
        start = time.perf_counter()
        with pytest.raises(OSError, match="address already in use"):
            await second.start()
        assert time.perf_counter() - start < 0.5


async def test_down_window_refuses_connections(client: aiohttp.ClientSession) -> None:
    """Inside a down window the port is closed (connection refused), then reopens."""
    async with fleet({"name": "d", "windows": [{"start_s": 0.3, "end_s": 0.8, "down": True}]}) as f:
        assert (await chat(client, f.url("d")))[0] == 200
        await asyncio.sleep(0.45 - f.now())
        with pytest.raises(aiohttp.ClientConnectorError):
            await chat(client, f.url("d"))
        assert not f.endpoints["d"].listening
        await asyncio.sleep(0.95 - f.now())
        assert (await chat(client, f.url("d")))[0] == 200


async def test_set_down_at_runtime(client: aiohttp.ClientSession) -> None:
    """set_down closes the port and cuts kept-alive connections; None brings it back."""
    async with fleet({"name": "a"}, {"name": "b"}) as f:
        assert (await chat(client, f.url("a")))[0] == 200
        await f.set_down("a", True)
        with pytest.raises(aiohttp.ClientConnectionError):
            await chat(client, f.url("a"))
        assert (await chat(client, f.url("b")))[0] == 200
        await f.set_down("a", None)
        assert (await chat(client, f.url("a")))[0] == 200


async def test_client_errors(client: aiohttp.ClientSession) -> None:
    """401 for a bad key, 400 for bad bodies, 404 for unknown models, in OpenAI's shape."""
    async with fleet({"name": "a"}, {"name": "open", "api_key": ""}) as f:
        base = f.url("a")
        bad_key = await chat(client, base, headers={"Authorization": "Bearer nope"})
        async with aiohttp.ClientSession() as anonymous:
            no_key = await chat(anonymous, base)
            open_ok = await chat(anonymous, f.url("open"))
        async with client.post(f"{base}/chat/completions", data=b"{not json") as response:
            not_json = response.status
        no_messages = await chat(client, base, {"model": "m"})
        streaming = await chat(client, base, {**CHAT, "stream": "yes"})
        unknown = await chat(client, base, {**CHAT, "model": "gpt-5"})
        async with client.get(f"{base}/nowhere") as response:
            nowhere = response.status
    for status, _, raw, _ in (bad_key, no_key):
        assert status == 401
        assert json.loads(raw)["error"]["code"] == "invalid_api_key"
        assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert open_ok[0] == 200
    assert (not_json, no_messages[0], streaming[0], nowhere) == (400, 400, 400, 404)
    assert unknown[0] == 404
    assert json.loads(unknown[2])["error"]["code"] == "model_not_found"


async def test_usage_malformed_and_drip(client: aiohttp.ClientSession) -> None:
    """Missing usage, a body that is not JSON, and a body that trickles in."""
    async with fleet(
        {"name": "nu", "no_usage_rate": 1.0},
        {"name": "bad", "malformed_rate": 1.0},
        {"name": "drip", "drip_s": 0.4, "drip_chunks": 4},
    ) as f:
        _, _, raw, _ = await chat(client, f.url("nu"))
        assert "usage" not in json.loads(raw)
        status, _, raw, _ = await chat(client, f.url("bad"))
        assert status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(raw)
        start = time.perf_counter()
        async with client.post(f"{f.url('drip')}/chat/completions", json=CHAT) as response:
            headers_after = time.perf_counter() - start
            body = json.loads(await response.read())
            body_after = time.perf_counter() - start
    assert headers_after < 0.2
    assert 0.38 <= body_after < 0.8
    assert body["usage"]["completion_tokens"] > 0


async def test_models_stats_and_reset(client: aiohttp.ClientSession) -> None:
    """/v1/models lists the models; /fleet/stats counts per endpoint; reset zeroes it."""
    async with fleet({"name": "a", "models": ["x", "y"]}, {"name": "b"}) as f:
        async with client.get(f"{f.url('a')}/models") as response:
            models = await response.json()
        await chat(client, f.url("a"), {**CHAT, "model": "x"})
        await chat(client, f.url("a"), {**CHAT, "model": "nope"})
        async with client.get(stats_url(f.url("b"))) as response:
            stats = await response.json()
        async with client.post(f.url("a").removesuffix("/v1") + "/fleet/reset") as response:
            assert response.status == 200
        after = f.stats()["a"]
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["x", "y"]
    a = stats["endpoints"]["a"]
    assert a["requests"] == 3
    assert a["by_status"] == {"200": 2, "404": 1}
    assert a["outcomes"] == {"ok": 1}
    assert (a["in_flight"], a["max_in_flight"], a["hangs"]) == (0, 1, 0)
    assert stats["endpoints"]["b"]["requests"] == 0
    assert (after.requests, after.by_status) == (0, {})


async def outcome_sequence(client: aiohttp.ClientSession, seed: int) -> list[tuple[Any, ...]]:
    async with fleet(
        {
            "name": "mix",
            "error_rate": 0.3,
            "rate_limit_rate": 0.2,
            "malformed_rate": 0.1,
            "no_usage_rate": 0.3,
        },
        seed=seed,
    ) as f:
        seen = []
        for _ in range(40):
            status, _, raw, _ = await chat(client, f.url("mix"))
            try:
                usage = json.loads(raw).get("usage")
            except json.JSONDecodeError:
                usage = "malformed"
            seen.append((status, usage))
        return seen


async def test_same_seed_same_outcomes(client: aiohttp.ClientSession) -> None:
    """Sequential requests under one seed replay exactly; another seed differs."""
    first = await outcome_sequence(client, 5)
    assert first == await outcome_sequence(client, 5)
    assert first != await outcome_sequence(client, 6)
    assert {s for s, _ in first} == {200, 429, 500}
    kinds = {
        "none" if u is None else "malformed" if u == "malformed" else "usage" for _, u in first
    }
    assert kinds == {"none", "malformed", "usage"}


async def test_shipped_scenarios_serve(client: aiohttp.ClientSession) -> None:
    """Every endpoint of every shipped scenario answers on a free port."""
    for path in sorted((ROOT / "workers" / "fleet" / "scenarios").glob("*.toml")):
        scenario = load_scenario(path).with_ephemeral_ports()
        key = scenario.api_key or ""
        async with Fleet(scenario) as f:
            for e in scenario.endpoints:
                headers = {"Authorization": f"Bearer {key}"}
                # Only OpenAI's dialect lists models; every kind serves the fleet's stats.
                probe = "/models" if e.kind == "openai" else "/fleet/stats"
                async with client.get(f"{f.url(e.name)}{probe}", headers=headers) as response:
                    assert response.status == 200, (path.name, e.name)


def test_command_reports_invalid_scenarios(tmp_path: Path) -> None:
    """The CLI names the bad field and exits 1 instead of printing a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[endpoints]]\nname = "a"\nmodels = ["m"]\nerror_rate = 2\n')
    result = CliRunner().invoke(fleet_command, ["--scenario", str(bad)])
    assert result.exit_code == 1
    assert "endpoints.0 (a).error_rate" in result.output


def test_run_fleet_in_a_subprocess(tmp_path: Path) -> None:
    """python -m workers.fleet announces each endpoint, serves, and exits on SIGTERM."""
    scenario = tmp_path / "one.toml"
    scenario.write_text('[[endpoints]]\nname = "solo"\nmodels = ["m", "n"]\n')
    with subprocess.Popen(
        [sys.executable, "-m", "workers.fleet", "--scenario", str(scenario), "--seed", "3"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    ) as proc:
        try:
            assert proc.stdout is not None
            name, url, models = proc.stdout.readline().split()
            assert proc.stdout.readline().startswith("fleet ready seed=3")
            assert (name, models) == ("solo", "m,n")
            with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                assert json.loads(response.read())["data"][1]["id"] == "n"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
