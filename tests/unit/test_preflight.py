"""The consumer-timeout start-up check: the rule, and reading the broker's management API.

The management API is faked on loopback (the shape RabbitMQ serves): the test
broker runs without the management plugin, and what matters here is how each
answer is read, including the ones a real broker gives only on other versions.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web

from schemas.codec import MAX_SLA_MS
from schemas.settings import Settings, load_settings
from workers.preflight import (
    BROKER_TICK_MS,
    consumer_timeout_problem,
    longest_deadline_ms,
    preflight,
    read_consumer_timeout,
)

HOUR = 3_600_000
PASSWORD = "s3cret-broker-pw"
BROKER_URL = f"amqp://llmq-worker:{PASSWORD}@127.0.0.1:5672/llmq%2Fprod"
QUEUES = ("llmq.q.batch", "llmq.q.interactive")


@pytest.mark.parametrize(
    ("timeout_ms", "longest_ms", "expected"),
    [
        (None, HOUR, "could not verify the broker's consumer_timeout; it must be at least 3660000"),
        (1_800_000, HOUR, "consumer_timeout (1800000 ms, 30 min) is too short"),  # 3.x default
        (HOUR + BROKER_TICK_MS - 1, HOUR, "is too short; it must be at least 3660000 ms (61 min)"),
        (HOUR + BROKER_TICK_MS, HOUR, None),
        (4_500_000, HOUR, None),  # deploy/rabbitmq/rabbitmq.conf: 75 min
        (4_500_000, MAX_SLA_MS, "at least 604860000 ms"),  # a week of deadline
        (90_000, 20_000, None),
        (70_000, 20_000, "at least 80000 ms (1 min 20 s)"),
    ],
)
def test_the_timeout_must_outlast_the_longest_deadline_and_a_broker_tick(
    timeout_ms: int | None, longest_ms: int, expected: str | None
) -> None:
    """consumer_timeout ≥ longest deadline + the broker's ~1 min check interval."""
    problem = consumer_timeout_problem(timeout_ms, longest_ms)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem
        assert "worker.max_sla_ms" in problem


def test_the_longest_deadline_is_the_worker_setting_else_the_codec_limit() -> None:
    """worker.max_sla_ms when the settings have it; the codec's one week before that."""
    with_setting = SimpleNamespace(worker=SimpleNamespace(max_sla_ms=120_000))
    without = SimpleNamespace(worker=SimpleNamespace())
    assert longest_deadline_ms(cast(Settings, with_setting)) == 120_000
    assert longest_deadline_ms(cast(Settings, without)) == MAX_SLA_MS


Answers = dict[str, Any]
"""Raw request path → JSON body to serve, or an int HTTP status, or bytes."""


class FakeManagement:
    def __init__(self) -> None:
        self.answers: Answers = {}
        self.seen: list[tuple[str, str | None]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.raw_path, request.headers.get("Authorization")))
        answer = self.answers.get(request.raw_path, 404)
        if isinstance(answer, int):
            return web.Response(status=answer, text="nope")
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        return web.json_response(answer)


@pytest.fixture
async def api() -> AsyncIterator[FakeManagement]:
    fake = FakeManagement()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.port = runner.addresses[0][1]
    try:
        yield fake
    finally:
        await runner.cleanup()


@pytest.fixture
def settings_for(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)

    def make(management_url: str | None, **worker: Any) -> Settings:
        return load_settings(
            None,
            broker={"url": BROKER_URL, "management_url": management_url},
            worker=worker,
        )

    return make


def queue_row(name: str, *, argument: int | None = None, policy: int | None = None) -> Any:
    return {
        "name": name,
        "arguments": {} if argument is None else {"x-consumer-timeout": argument},
        # RabbitMQ serves an empty definition as [], a set one as an object.
        "effective_policy_definition": [] if policy is None else {"consumer-timeout": policy},
    }


def serve(fake: FakeManagement, version: str, rows: dict[str, Any]) -> None:
    fake.answers["/api/overview"] = {"rabbitmq_version": version, "cluster_name": "rabbit@x"}
    for name, row in rows.items():
        fake.answers[f"/api/queues/llmq%2Fprod/{name}"] = row


def broker_auth() -> str:
    return "Basic " + base64.b64encode(f"llmq-worker:{PASSWORD}".encode()).decode()


async def test_a_310_broker_cannot_be_verified_and_says_what_to_check(
    api: FakeManagement, settings_for: Callable[..., Settings]
) -> None:
    """3.10 ignores and reports no per-queue timeout, and no version reports the global
    one: unverified, with the value rabbitmq.conf needs. Asked with the broker's user."""
    serve(api, "3.10.8", {q: queue_row(q, argument=4_500_000) for q in QUEUES})
    settings = settings_for(f"http://127.0.0.1:{api.port}/", max_sla_ms=HOUR)
    assert await read_consumer_timeout(settings) is None
    [problem] = await preflight(settings)
    assert problem.startswith("could not verify the broker's consumer_timeout")
    assert "3660000 ms" in problem and "RabbitMQ 3.10" in problem and "rabbitmq.conf" in problem
    assert f"http://127.0.0.1:{api.port} " in problem
    assert PASSWORD not in problem
    assert api.seen[0] == ("/api/overview", broker_auth())
    assert [path for path, _ in api.seen] == ["/api/overview", "/api/overview"]


async def test_queue_timeouts_are_read_on_312_and_later_and_the_smallest_counts(
    api: FakeManagement, settings_for: Callable[..., Settings]
) -> None:
    """An argument or a policy on each work queue; the smallest is the one that bites."""
    settings = settings_for(f"http://127.0.0.1:{api.port}", max_sla_ms=HOUR)
    serve(api, "3.13.7", {q: queue_row(q, argument=4_500_000) for q in QUEUES})
    assert await read_consumer_timeout(settings) == 4_500_000
    assert await preflight(settings) == []
    requested = {path for path, _ in api.seen}
    assert {f"/api/queues/llmq%2Fprod/{q}" for q in QUEUES} <= requested
    serve(api, "4.0.5", {QUEUES[0]: queue_row(QUEUES[0], argument=4_500_000, policy=1_800_000)})
    assert await read_consumer_timeout(settings) == 1_800_000
    [problem] = await preflight(settings)
    assert "consumer_timeout (1800000 ms, 30 min) is too short" in problem


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        ({"/api/overview": 401}, "answered HTTP 401"),
        ({"/api/overview": b"{not json"}, "failed: JSONDecodeError"),
        ({"/api/overview": {"rabbitmq_version": "banana"}}, "RabbitMQ an unknown version"),
        ({"/api/overview": ["not", "an", "object"]}, "RabbitMQ an unknown version"),
        (
            {"/api/overview": {"rabbitmq_version": "3.12.0"}},
            "answered HTTP 404",  # the work queues are not declared yet
        ),
        (
            {
                "/api/overview": {"rabbitmq_version": "3.12.0"},
                f"/api/queues/llmq%2Fprod/{QUEUES[0]}": queue_row(QUEUES[0]),
                f"/api/queues/llmq%2Fprod/{QUEUES[1]}": queue_row(QUEUES[1], policy=9_000_000),
            },
            "a work queue sets no x-consumer-timeout",
        ),
    ],
)
async def test_what_cannot_be_read_is_unverified_with_the_reason(
    api: FakeManagement,
    settings_for: Callable[..., Settings],
    answers: Answers,
    reason: str,
) -> None:
    """Refusals, garbage and missing settings all read as None, never as a guess."""
    api.answers.update(answers)
    settings = settings_for(f"http://127.0.0.1:{api.port}")
    assert await read_consumer_timeout(settings) is None
    [problem] = await preflight(settings)
    assert problem.startswith("could not verify") and reason in problem
    assert PASSWORD not in problem


async def test_an_unreachable_api_is_unverified_without_credentials_in_the_text(
    settings_for: Callable[..., Settings],
) -> None:
    """Connection refused: the reason is the error's type, not its text (it may quote
    the URL); credentials written into management_url are cut out of what is shown."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        settings = settings_for(f"http://admin:mgmt-pw@127.0.0.1:{port}/")
        [problem] = await preflight(settings)
    assert f"at http://127.0.0.1:{port} failed: ClientConnectorError" in problem
    assert "mgmt-pw" not in problem and "admin" not in problem and PASSWORD not in problem
    bad_port = settings_for("http://127.0.0.1:notaport/")
    [problem] = await preflight(bad_port)
    assert "broker.management_url is not a valid URL" in problem


async def test_credentials_in_the_management_url_are_used_instead(
    api: FakeManagement, settings_for: Callable[..., Settings]
) -> None:
    """An operator may give the management API its own user in management_url."""
    serve(api, "3.10.8", {})
    settings = settings_for(f"http://monitor:mgmt%40pw@127.0.0.1:{api.port}")
    [problem] = await preflight(settings)
    assert api.seen[0][1] == "Basic " + base64.b64encode(b"monitor:mgmt@pw").decode()
    assert "mgmt" not in problem and "monitor" not in problem


async def test_without_a_management_url_there_is_nothing_to_check(
    settings_for: Callable[..., Settings],
) -> None:
    """The check runs only where the operator configured the management API."""
    settings = settings_for(None)
    assert await preflight(settings) == []
    assert await read_consumer_timeout(settings) is None
