"""A minimal AMQP 0-9-1 publisher that writes a message's property bytes as given.

aio-pika, aiormq and pamqp only build well-formed messages, but the broker
accepts many that are not: invalid UTF-8 in a short string, a timestamp past
year 9999, a header table nested thousands deep, a field type tag nobody
knows. Tests that need such a message build its property block byte by byte
with the helpers here and publish it with :class:`RawPublisher`, which does
the handshake and the method frames with pamqp and writes the content header
frame itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from types import TracebackType
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame, header
from pamqp.base import Frame

__all__ = [
    "FLAGS",
    "RawPublisher",
    "Refused",
    "entry",
    "longstr",
    "nested_table",
    "properties",
    "shortstr",
    "table",
    "timestamp",
]

FLAGS = {
    "content_type": 0x8000,
    "content_encoding": 0x4000,
    "headers": 0x2000,
    "delivery_mode": 0x1000,
    "priority": 0x0800,
    "correlation_id": 0x0400,
    "reply_to": 0x0200,
    "expiration": 0x0100,
    "message_id": 0x0080,
    "timestamp": 0x0040,
    "type": 0x0020,
    "user_id": 0x0010,
    "app_id": 0x0008,
    "cluster_id": 0x0004,
}
"""Basic's property flag bits, in wire order."""

_FRAME_HEADER = 2
_FRAME_END = b"\xce"


def shortstr(data: bytes) -> bytes:
    """A short string: one length byte, then the bytes (not checked for UTF-8)."""
    return bytes([len(data)]) + data


def longstr(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def timestamp(value: int) -> bytes:
    """A 64-bit timestamp; any value, including ones past year 9999."""
    return struct.pack(">Q", value)


def entry(key: bytes, tag: bytes, value: bytes) -> bytes:
    """One field-table entry: the key as a short string, a type tag, the value."""
    return shortstr(key) + tag + value


def table(*entries: bytes) -> bytes:
    """A field table of raw entries, with its 32-bit length."""
    body = b"".join(entries)
    return struct.pack(">I", len(body)) + body


def nested_table(depth: int, leaf: bytes = b"") -> bytes:
    """A table whose one entry ``n`` holds a table, ``depth`` levels down."""
    inner = table(leaf) if leaf else table()
    for _ in range(depth - 1):
        inner = table(entry(b"n", b"F", inner))
    return inner


def properties(**fields: bytes) -> bytes:
    """A property block: the flag word, then each field's raw bytes in wire order.

    Values are already encoded (``shortstr(b"id")``, ``table(...)``,
    ``bytes([2])`` for delivery_mode): nothing is checked.
    """
    unknown = set(fields) - set(FLAGS)
    if unknown:
        raise ValueError(f"unknown properties: {sorted(unknown)}")
    flags = 0
    parts = []
    for name, bit in FLAGS.items():
        if name in fields:
            flags |= bit
            parts.append(fields[name])
    return struct.pack(">H", flags) + b"".join(parts)


class Refused(Exception):
    """The broker closed the channel or connection instead of confirming."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class RawPublisher:
    """One connection, one confirming channel: ``async with RawPublisher(url) as p``."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._next_tag = 1
        self.frame_max = 131_072

    async def __aenter__(self) -> RawPublisher:
        parts = urlsplit(self._url)
        self._reader, self._writer = await asyncio.open_connection(
            parts.hostname or "127.0.0.1", parts.port or 5672
        )
        try:
            await self._handshake(
                unquote(parts.username or "guest"),
                unquote(parts.password or "guest"),
                unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            )
        except BaseException:
            self._writer.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self._writer.write(header.ProtocolHeader().marshal())
        start = await self._expect(commands.Connection.Start)
        assert isinstance(start, commands.Connection.Start)
        self._send(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "llmq-tests-rawamqp"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
            ),
        )
        tune = await self._expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        self.frame_max = tune.frame_max
        self._send(
            0,
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
            ),
        )
        self._send(0, commands.Connection.Open(virtual_host=vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(1, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)

    def _send(self, channel: int, method: Frame) -> None:
        self._writer.write(frame.marshal(method, channel))

    async def _read(self) -> object:
        head = await self._reader.readexactly(7)
        _, _, size = struct.unpack(">BHI", head)
        rest = await self._reader.readexactly(size + 1)
        if head[0] != 1:
            return None  # a returned message's content: ours, possibly undecodable
        if rest[:4] in (b"\x00\x0a\x00\x32", b"\x00\x14\x00\x28"):  # Connection/Channel.Close
            (code,) = struct.unpack_from(">H", rest, 4)
            # A close may quote our bytes (a user_id that is not UTF-8): read it leniently.
            text = rest[7 : 7 + rest[6]].decode("utf-8", "replace")
            raise Refused(code, text)
        return frame.unmarshal(head + rest)[2]

    async def _expect(self, kind: type[Frame]) -> Frame:
        while True:
            got = await self._read()
            if isinstance(got, commands.Connection.Close | commands.Channel.Close):
                raise Refused(got.reply_code, got.reply_text)
            if isinstance(got, kind):
                return got

    async def publish(
        self,
        *,
        exchange: str,
        routing_key: str | bytes,
        body: bytes,
        properties: bytes,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; :class:`Refused` if it closes on us.

        A ``bytes`` routing key is written as is, UTF-8 or not.
        """
        key = routing_key.encode() if isinstance(routing_key, str) else routing_key
        # Basic.Publish by hand (pamqp would refuse a key that is not UTF-8):
        # class 60 method 40, ticket 0, exchange, routing key, the mandatory bit.
        method = (
            struct.pack(">HHH", 60, 40, 0)
            + shortstr(exchange.encode())
            + shortstr(key)
            + bytes([1 if mandatory else 0])
        )
        self._writer.write(struct.pack(">BHI", 1, 1, len(method)) + method + _FRAME_END)
        fixed = struct.pack(">HHQ", commands.Basic.frame_id, 0, len(body))
        payload = fixed + properties
        self._writer.write(
            struct.pack(">BHI", _FRAME_HEADER, 1, len(payload)) + payload + _FRAME_END
        )
        step = self.frame_max - 8
        for at in range(0, len(body), step):
            chunk = body[at : at + step]
            self._writer.write(struct.pack(">BHI", 3, 1, len(chunk)) + chunk + _FRAME_END)
        await self._writer.drain()
        tag = self._next_tag
        self._next_tag += 1
        while True:
            got = await self._expect(Frame)
            if isinstance(got, commands.Basic.Nack):
                raise Refused(0, "nack")
            if isinstance(got, commands.Basic.Return):
                raise Refused(got.reply_code, got.reply_text)
            if isinstance(got, commands.Basic.Ack) and got.delivery_tag >= tag:
                return
