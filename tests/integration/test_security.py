"""Secrets stay secret and a job can never choose where it is sent."""

from __future__ import annotations

import logging
from collections.abc import Callable

import aio_pika
import pytest
from harness import Caller, chat, running_fleet

from schemas.logs import JsonFormatter
from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

SENTINEL = "sk-SENTINEL-7f3a9c1e5b2d8f4a6c0e"


def _leaks(text: str) -> bool:
    return SENTINEL in text or SENTINEL[-8:] in text


async def test_upstream_keys_never_leak(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Traffic with a sentinel key, including 401s whose message echoes the whole
    key: nothing we emit (logs, replies, dead letters, status, reprs) contains it."""
    endpoints = (
        {"name": "good", "models": ["m1"], "api_key": SENTINEL},
        {
            "name": "echo",
            "models": ["m1", "m2"],
            "api_key": "sk-other-key-000000000",
            "echo_key": "full",
        },
        {"name": "broken", "models": ["m3"], "api_key": SENTINEL, "error_rate": 1.0},
    )
    caplog.set_level(logging.DEBUG)
    async with running_fleet(*endpoints) as fleet:
        monkeypatch.setenv("LLMQ_TEST_FLEET_KEY", SENTINEL)
        settings = make_settings(fleet)
        worker = Worker(settings, name="w")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        try:
            ids = [await caller.publish(chat(model)) for model in ("m1", "m1", "m2", "m3", "m1")]
            await caller.wait_for(lambda: set(ids) <= set(caller.replies), timeout=60)
            await caller.wait_for(lambda: len(caller.dead) >= 2)
            snapshot = worker.router.snapshot(now=0.0)
            status = worker.status()
        finally:
            await worker.stop(grace_s=5)
    codes = {
        caller.replies[j][0]["status"]
        if caller.replies[j][0]["status"] == "ok"
        else caller.replies[j][0]["error"]["code"]
        for j in ids
    }
    # The failure paths ran. m2's only endpoint refuses our key: our configuration
    # is wrong and retrying cannot help until it is fixed, hence upstream_rejected.
    assert {"ok", "upstream_rejected", "upstream_error"} <= codes
    assert fleet.stats()["echo"].by_status.get(401, 0) >= 1  # and a 401 echoed the key

    emitted: list[str] = []
    json_format, text_format = JsonFormatter(), logging.Formatter()
    for record in caplog.records:
        emitted += [json_format.format(record), text_format.format(record)]
    for replies in caller.replies.values():
        emitted += [str(r) for r in replies]
    for dead in caller.dead:
        emitted += [dead.body.decode(), str(dead.headers), str(dead.properties)]
    emitted += [str(snapshot), str(status), repr(worker), repr(worker.router)]
    emitted += [repr(settings), str(settings), settings.model_dump_json()]
    emitted += [repr(e) for e in settings.endpoints]
    leaks = [text[:200] for text in emitted if _leaks(text)]
    assert leaks == []
    assert any("[redacted]" in text for text in emitted)  # the echo was there, scrubbed


async def test_a_job_cannot_choose_its_upstream(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """URL-ish values in the body or headers change nothing: only configured
    endpoints are called."""
    async with (
        running_fleet({"name": "configured", "models": ["m1"]}) as fleet,
        running_fleet({"name": "decoy", "models": ["m1"]}) as decoy,
    ):
        settings = make_settings(fleet)
        worker = Worker(settings, name="w")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        url = decoy.url("decoy")
        try:
            steered = await caller.publish(
                chat(api_base=url, base_url=url, api_key="sk-x", extra_headers={"Host": "x"}),
                headers={"endpoint": url, "base-url": url, "model": "m1"},
            )
            by_model = await caller.publish(chat(url))
            by_header = await caller.publish(chat(), headers={"model": f"{url}/chat/completions"})
            await caller.wait_for(lambda: {steered, by_model, by_header} <= set(caller.replies))
        finally:
            await worker.stop(grace_s=5)
    assert decoy.stats()["decoy"].requests == 0
    assert caller.replies[steered][0]["routing"]["endpoint"] == "configured"
    assert caller.replies[by_model][0]["error"]["code"] == "unknown_model"
    assert caller.replies[by_header][0]["error"]["code"] == "unknown_model"
