"""An open-loop load generator for anything that speaks OpenAI's
``/v1/chat/completions``, streamed or not, and what it measures.

A *system* is a base URL (``http://host:port/v1``), the Bearer key it wants
and, optionally, the pid whose CPU time is charged to it. Requests start on
a fixed schedule (``rate`` per second, evenly spaced) whatever the answers
do: a slow system gets a growing backlog, not fewer requests (no coordinated
omission), and every latency is measured from the request's *scheduled*
start, so the generator's own lateness counts against the system rather
than hiding it.

The client is aiohttp with keep-alive, reading the event stream line by
line and decoding JSON only until the first token is seen; the ``openai``
SDK would cost about a millisecond of client CPU per call plus a pydantic
model per chunk, and at 500 streams/s of 32 chunks the generator (one core
of two) would measure itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.harness import cpu_seconds, percentile


@dataclass(frozen=True, slots=True)
class System:
    """Something that answers ``POST {base_url}/chat/completions`` as OpenAI does."""

    name: str
    base_url: str
    api_key: str
    pid: int | None = None
    """The process whose CPU (with its children's) is charged to the system."""
    role: str = "proxy"
    """What ``pid`` is, for the CPU broken down by process."""
    also: tuple[tuple[str, int], ...] = ()
    """Further processes charged to the system, by role: llmq's worker behind its
    gateway. Their CPU counts in the system's, and is reported on its own too."""

    def processes(self) -> dict[str, int]:
        """Role -> pid of every process charged to the system."""
        return ({self.role: self.pid} if self.pid else {}) | dict(self.also)


@dataclass(frozen=True, slots=True)
class Sample:
    ok: bool
    total_ms: float
    """From the scheduled start to the last byte (``[DONE]`` for a stream)."""
    ttft_ms: float | None = None
    """Streams: from the scheduled start to the first chunk with content."""
    error: str | None = None


def request_body(model: str, stream: bool, max_tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return orjson.dumps(body)


def has_content(line: bytes) -> bool:
    """Whether an SSE line is a chunk carrying a token (not the role-only one)."""
    if not line.startswith(b"data: {"):
        return False
    try:
        chunk = orjson.loads(line[6:])
    except orjson.JSONDecodeError:
        return False
    choices = chunk.get("choices") or []
    return any((c.get("delta") or {}).get("content") for c in choices)


async def call(
    http: aiohttp.ClientSession, system: System, body: bytes, stream: bool, start: float
) -> Sample:
    """One request; ``start`` is its scheduled ``perf_counter`` time."""
    url = f"{system.base_url.rstrip('/')}/chat/completions"
    headers = {"Authorization": f"Bearer {system.api_key}", "Content-Type": "application/json"}
    ttft: float | None = None
    try:
        async with http.post(url, data=body, headers=headers) as r:
            if r.status != 200:
                await r.read()
                return Sample(False, _ms(start), error=f"http {r.status}")
            if not stream:
                answer = orjson.loads(await r.read())
                ok = answer.get("object") == "chat.completion"
                return Sample(ok, _ms(start), error=None if ok else "not a chat.completion")
            done = False
            async for raw in r.content:
                line = raw.rstrip()
                if ttft is None and has_content(line):
                    ttft = _ms(start)
                elif line == b"data: [DONE]":
                    done = True
            ok = done and ttft is not None
            return Sample(ok, _ms(start), ttft, None if ok else "stream ended early")
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as e:
        return Sample(False, _ms(start), ttft, type(e).__name__)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


async def open_loop(
    http: aiohttp.ClientSession,
    system: System,
    body: bytes,
    stream: bool,
    rate: float,
    seconds: float,
    timeout_s: float,
) -> tuple[list[Sample], float]:
    """``rate`` requests/s for ``seconds``; every request is bounded by ``timeout_s``.
    Returns the samples and the generator's worst lateness in ms."""
    count = max(1, round(rate * seconds))
    interval = 1.0 / rate
    t0 = time.perf_counter() + 0.01
    tasks: list[asyncio.Task[Sample]] = []
    late = 0.0

    async def bounded(start: float) -> Sample:
        try:
            return await asyncio.wait_for(call(http, system, body, stream, start), timeout_s)
        except TimeoutError:
            return Sample(False, _ms(start), error="timeout")

    for i in range(count):
        start = t0 + i * interval
        delay = start - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay * 1000)
        tasks.append(asyncio.create_task(bounded(start)))
    return list(await asyncio.gather(*tasks)), late


def summarize(samples: list[Sample], stream: bool) -> dict[str, Any]:
    """Success rate and latency percentiles of the successful requests."""
    good = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error or "?"] = errors.get(s.error or "?", 0) + 1
    out: dict[str, Any] = {
        "requests": len(samples),
        "success": round(len(good) / len(samples), 4) if samples else 0.0,
        "errors": errors,
    }
    fields = {"total": [s.total_ms for s in good]}
    if stream:
        fields["ttft"] = [s.ttft_ms for s in good if s.ttft_ms is not None]
    for name, values in fields.items():
        if values:
            out[f"{name}_p50_ms"] = round(percentile(values, 0.50), 2)
            out[f"{name}_p99_ms"] = round(percentile(values, 0.99), 2)
    return out


def added(row: dict[str, Any], ceiling: dict[str, Any]) -> dict[str, float]:
    """A system's percentiles minus the direct call's, same rate and mode."""
    return {
        key: round(row[key] - ceiling[key], 2)
        for key in row
        if key.endswith("_ms") and key in ceiling
    }


def cpu_by_process(system: System) -> dict[str, float]:
    """CPU seconds so far of each process charged to the system, by role."""
    return {role: tree_cpu_seconds(pid) for role, pid in system.processes().items()}


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (a proxy may fork workers)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        total += sum(tree_cpu_seconds(int(child)) for child in children)
    return total


def remote_peers(pid: int) -> set[str]:
    """Non-loopback addresses the process has sockets to (a check that nothing
    leaves the machine): its socket inodes matched against /proc/net."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers: set[str] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                address = fields[2].split(":")[0]
                if address.strip("0") and not _loopback(address):
                    peers.add(f"{table}:{address}")
    return peers


def _loopback(hex_address: str) -> bool:
    """127.0.0.0/8 in /proc/net's little-endian hex, or ::1 / ::ffff:127.x."""
    if len(hex_address) == 8:
        return hex_address.endswith("7F")
    return hex_address in ("00000000000000000000000001000000",) or (
        hex_address.startswith("0000000000000000FFFF0000") and hex_address.endswith("7F")
    )
