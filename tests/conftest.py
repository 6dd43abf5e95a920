"""Shared fixtures: a private RabbitMQ vhost per test module.

Tests share the machine's broker with the demo and with each other, so each
module declares everything inside its own vhost and deletes the vhost when
it is done, leaving the broker as it found it. A vhost per module, not per
session, because RabbitMQ 3.10 reserves about three file handles for every
quorum queue and the Debian node's limit is 927: the whole suite's queues
kept to the end (some 300) exhaust it, and the node then accepts TCP but
answers nothing. Without a broker the broker tests skip locally and fail in
CI (CI=true), where a skip would hide a gap; a broker that stops answering
mid-run ends the run at the next test connection or module (within ~30 s)
instead of timing out every later test.

The broker under test is the machine's (127.0.0.1:5672, the host's
rabbitmqctl, RabbitMQ 3.10) unless the environment names another:
LLMQ_TEST_BROKER_HOST / LLMQ_TEST_BROKER_PORT, LLMQ_TEST_RABBITMQCTL (a
command that behaves like rabbitmqctl for that node, e.g. ``scripts/rabbitmq4
ctl``) and LLMQ_TEST_BROKER_VERSION (``3.10`` or ``4``: what tests that depend
on the version read, through ``broker_version`` and the ``broker`` marker).
``scripts/rabbitmq4 env`` prints these for the 4.x node.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from harness import FLEET_KEY, TEST_REPLY_QUEUES
from hypothesis import settings

from schemas.settings import Settings, load_settings
from workers.fleet import Fleet

# CI replays a fixed set of examples so a new random find can't fail an
# unrelated change; local runs keep exploring (and remember what they find).
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

BROKER_HOST = os.environ.get("LLMQ_TEST_BROKER_HOST", "127.0.0.1")
BROKER_PORT = int(os.environ.get("LLMQ_TEST_BROKER_PORT", "5672"))
BROKER_VERSION = os.environ.get("LLMQ_TEST_BROKER_VERSION", "3.10")
RABBITMQCTL = shlex.split(os.environ.get("LLMQ_TEST_RABBITMQCTL", "rabbitmqctl"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "broker(version, reason): the test checks what only that broker version "
        "(3.10 or 4) does; on another it is skipped with the reason",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("broker"):
            version = mark.args[0]
            if version != BROKER_VERSION:
                reason = mark.kwargs.get("reason") or (mark.args[1] if len(mark.args) > 1 else "")
                if not reason:
                    raise pytest.UsageError(f"{item.nodeid}: a broker mark needs a reason")
                skip = f"RabbitMQ {version} only (testing {BROKER_VERSION}): {reason}"
                item.add_marker(pytest.mark.skip(reason=skip))


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*RABBITMQCTL, "-q", *args], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.exit(f"RabbitMQ stopped answering: rabbitmqctl {args[0]} hung for 60 s", 3)


def _answers(host: str, timeout: float = 15.0) -> bool:
    """The broker completes the start of an AMQP handshake (a wedged node
    accepts TCP and then says nothing)."""
    try:
        with socket.create_connection((host, BROKER_PORT), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # the first byte of Connection.Start
    except OSError:
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"RabbitMQ is required in CI: {reason}")
    pytest.skip(f"no RabbitMQ: {reason}")


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    """A fresh vhost with full permissions for guest, deleted afterwards."""
    if shutil.which(RABBITMQCTL[0]) is None:
        _unavailable(f"{RABBITMQCTL[0]} is not installed")
    if _BROKER_SEEN and not _answers(BROKER_HOST):
        pytest.exit("RabbitMQ stopped answering the AMQP handshake mid-run", 3)
    name = f"llmq-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    created = _rabbitmqctl("add_vhost", name)
    if created.returncode != 0:
        _unavailable(created.stderr.strip() or "rabbitmqctl add_vhost failed")
    _BROKER_SEEN.append(name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


_BROKER_SEEN: list[str] = []  # vhosts made so far: the broker was up once


@pytest.fixture(scope="module")
def amqp_url(vhost: str) -> str:
    """The AMQP URL of the session's private vhost."""
    return f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/{quote(vhost, safe='')}"


@pytest.fixture
def rabbitmqctl() -> object:
    """Run rabbitmqctl; tests that change broker state must restore it."""
    return _rabbitmqctl


@pytest.fixture(scope="session")
def broker_version() -> str:
    """The version label of the broker under test: ``3.10`` or ``4``."""
    return BROKER_VERSION


# Fixtures for tests that run workers against the fake fleet: each test gets
# its own exchange and queue names inside the session's vhost.


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
        sections["worker"] = {"reply_queues": TEST_REPLY_QUEUES, **sections.get("worker", {})}
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
    try:
        conn = await asyncio.wait_for(aio_pika.connect(amqp_url), 30)
    except TimeoutError:
        if not _answers(BROKER_HOST):
            pytest.exit("RabbitMQ stopped answering the AMQP handshake mid-run", 3)
        raise
    yield conn
    await conn.close()
