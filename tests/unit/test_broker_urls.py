"""Several broker addresses: parsing, the one-account check, the order tried, and
the socket factory that moves on to the next node (no broker: loopback sockets)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator

import pytest
from yarl import URL

from schemas.broker.connection import FailoverTransportFactory, open_connection
from schemas.broker.errors import BrokerUnreachable
from schemas.broker_urls import Rotation, check_urls, node_of, split_urls
from schemas.settings import ConfigError, load_settings

SECRET = "pa,ss-s3cret"  # a comma in a password must not split the list


def url(port: int, password: str = SECRET, host: str = "127.0.0.1", tail: str = "/v") -> str:
    return f"amqp://llmq:{password}@{host}:{port}{tail}"


# Parsing


def test_a_comma_separates_urls_only_before_a_scheme() -> None:
    """A password with a comma stays whole; spaces around separators go."""
    assert split_urls(f"{url(1)} , {url(2)},AMQPS://h") == (url(1), url(2), "AMQPS://h")
    assert split_urls(url(1)) == (url(1),)
    assert split_urls("  ") == ()


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        (url(5673), "127.0.0.1:5673"),
        ("amqp://u:p@rabbit/v", "rabbit:5672"),
        ("amqps://u:p@rabbit/v", "rabbit:5671"),
        ("amqp://[::1]:5680/", "[::1]:5680"),
        ("amqp://u:p@h:port/", "[unparseable URL]"),
    ],
)
def test_node_of_shows_host_and_port_only(given: str, shown: str) -> None:
    assert node_of(given) == shown


@pytest.mark.parametrize(
    ("urls", "problem"),
    [
        ([], "no broker address"),
        (["http://h/"], "^must be an amqp"),
        ([url(1), "http://h/"], "address 2 \\(h:5672\\): must be an amqp"),
        ([url(1), "amqp://u:p@h:x/"], "address 2 .* not a valid URL"),
        ([url(1), url(2).replace("amqp:", "amqps:")], "in its scheme"),
        ([url(1), url(2).replace("llmq:", "other:")], "in its user"),
        ([url(1), url(2, password="another")], "in its password"),
        ([url(1), url(2, tail="/w")], "in its virtual host"),
        ([url(1), url(2, tail="/v?heartbeat=5")], "in its options"),
    ],
)
def test_addresses_must_share_one_account(urls: list[str], problem: str) -> None:
    """Only host and port may differ; the message never holds a password."""
    with pytest.raises(ValueError, match=problem) as raised:
        check_urls(urls)
    assert "s3cret" not in str(raised.value) and "another" not in str(raised.value)


def test_same_account_with_trailing_slash_and_case_passes() -> None:
    check_urls([url(1, tail="/v/"), url(2, host="other").replace("amqp:", "AMQP:")])
    check_urls(["amqp://h1", "amqp://h2/"])


# Settings


def test_settings_take_a_list_in_url_or_urls_and_hold_both_forms() -> None:
    joined = f"{url(1)},{url(2)}"
    for broker in ({"url": joined}, {"urls": [url(1), url(2)]}, {"urls": joined}):
        loaded = load_settings(None, broker=broker).broker
        assert loaded.addresses == (url(1), url(2))
        assert loaded.url.get_secret_value() == joined
        assert "s3cret" not in repr(loaded)
    assert load_settings(None).broker.addresses == ("amqp://guest:guest@127.0.0.1:5672/",)


def test_the_environment_takes_the_list_in_either_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)
    monkeypatch.setenv("LLMQ_BROKER__URL", f"{url(1)},{url(2)}")
    assert load_settings(None).broker.addresses == (url(1), url(2))
    monkeypatch.delenv("LLMQ_BROKER__URL")
    monkeypatch.setenv("LLMQ_BROKER__URLS", f'["{url(3)}", "{url(4)}"]')
    assert load_settings(None).broker.addresses == (url(3), url(4))


@pytest.mark.parametrize(
    ("broker", "problem"),
    [
        ({"url": url(1), "urls": [url(2)]}, "config error: broker: broker.url and broker.urls"),
        ({"url": f"{url(1)},{url(2, password='x')}"}, "config error: broker.url: address 2"),
        ({"urls": [url(1), url(2, password="x")]}, "config error: broker.urls: address 2"),
    ],
)
def test_settings_refuse_two_lists_and_two_accounts(
    broker: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        load_settings(None, broker=broker)
    assert "s3cret" not in str(raised.value)


# The order tried


def test_a_command_tries_the_addresses_in_the_order_written() -> None:
    rotation = Rotation(3)
    assert rotation.round() == (0, 1, 2)
    rotation.connected(0)  # lost later: the next node first, the lost one last
    assert rotation.round() == (1, 2, 0)
    rotation.connected(2)
    assert rotation.round() == (0, 1, 2)


def test_a_fleet_spreads_and_a_lost_node_is_tried_last() -> None:
    """Random first nodes cover the cluster; after a drop the others come first,
    starting at a random one, so a dead node's clients spread over the live ones."""
    starts = {Rotation(3, random.Random(seed)).round()[0] for seed in range(50)}
    assert starts == {0, 1, 2}
    firsts = set()
    for seed in range(50):
        rotation = Rotation(3, random.Random(seed))
        rotation.connected(1)
        order = rotation.round()
        assert order[-1] == 1 and sorted(order) == [0, 1, 2]
        firsts.add(order[0])
    assert firsts == {0, 2}


def test_one_address_is_always_that_address() -> None:
    rotation = Rotation(1, random.Random(1))
    rotation.connected(0)
    assert rotation.round() == (0,)
    with pytest.raises(ValueError, match="at least one"):
        Rotation(0)


# The socket factory (loopback listeners, no broker)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback listener that counts the sockets it accepted."""
    accepted: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], accepted
    server.close()
    await server.wait_closed()


async def test_the_factory_skips_a_dead_node_and_stays_on_the_live_one(
    listener: tuple[int, list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    """The first address refuses: the socket goes to the second at once; the
    warning names host:port, never the password."""
    port, accepted = listener
    dead = closed_port()
    factory = FailoverTransportFactory([url(dead), url(port)])
    with caplog.at_level(logging.WARNING, logger="llmq.broker"):
        _, writer = await factory.create(URL(url(dead)))
    writer.close()
    assert accepted == [1] and factory.rotation.current == 1
    assert factory.node is not None and factory.node.port == port
    assert f"127.0.0.1:{dead} unreachable" in caplog.text
    assert "s3cret" not in caplog.text


async def test_no_live_node_is_our_error_naming_each_node() -> None:
    first, second = closed_port(), closed_port()
    factory = FailoverTransportFactory([url(first), url(second)])
    with pytest.raises(BrokerUnreachable) as raised:
        await factory.create(URL(url(first)))
    text = str(raised.value)
    assert f"127.0.0.1:{first} (" in text and f"127.0.0.1:{second} (" in text
    assert "s3cret" not in text
    assert isinstance(raised.value, ConnectionError)  # callers catch it as before


async def test_a_command_tries_every_node_then_fails_with_our_error(
    listener: tuple[int, list[int]],
) -> None:
    """A node that accepts the socket but never speaks AMQP (it closes): the command
    tries again starting at the next node (which refuses, so back to the first);
    one attempt per node, then the handshake's error is raised."""
    port, accepted = listener
    dead = closed_port()
    with pytest.raises(ConnectionError) as raised:
        await open_connection([url(port), url(dead)], name="t")
    assert accepted == [1, 1]
    assert "s3cret" not in str(raised.value)
    with pytest.raises(BrokerUnreachable):
        await open_connection(f"{url(dead)},{url(closed_port())}", name="t")
    with pytest.raises(ValueError, match="no broker address"):
        await open_connection("", name="t")
