"""The routing benchmark's inputs: the seeded job stream, the scenario files
(ports and, for ``--quick``, compressed windows) and the lower bound computed
from the fleet's own plan. Pure functions, no I/O besides writing a TOML file."""

from __future__ import annotations

import json
import math
import random
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.fleet import Scenario, load_scenario
from workers.fleet.plan import effective, latency_s
from workers.fleet.scenario import Endpoint

LEAD_S = 0.5
"""Fleet time at which the job stream starts; scenario windows are written for it."""
FULL_S = 12.0
"""Length of the full stream the scenario files' windows are written for."""
MAX_TOKENS = ((64, 0.30), (128, 0.30), (256, 0.25), (512, 0.15))
"""max_tokens of a job and its probability."""
_WORDS = [
    "route",
    "queue",
    "token",
    "model",
    "answer",
    "latency",
    "deadline",
    "endpoint",
    "broker",
    "reply",
]


@dataclass(frozen=True, slots=True)
class Job:
    index: int
    at: float
    """Seconds after the stream starts (Poisson arrivals)."""
    max_tokens: int
    prompt: str

    def body(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
        }


def job_stream(seed: int, rate: float, duration_s: float) -> list[Job]:
    """Open-loop Poisson arrivals at ``rate`` jobs/s for ``duration_s``, all seeded."""
    rng = random.Random(f"jobs:{seed}")
    sizes, weights = zip(*MAX_TOKENS, strict=True)
    jobs: list[Job] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 80)))
        cap = int(rng.choices(sizes, weights)[0])
        jobs.append(Job(len(jobs), t, cap, f"job {len(jobs)}: {words}"))
        t += rng.expovariate(rate)
    return jobs


# --- scenario files ------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound then released; the fleet binds them next)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _dump(data: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if k != "endpoints"]
    for endpoint in data["endpoints"]:
        lines.append("[[endpoints]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in endpoint.items() if k != "windows"]
        for window in endpoint.get("windows", []):
            lines.append("[[endpoints.windows]]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in window.items()]
    return "\n".join(lines) + "\n"


def prepare_scenario(source: Path, out: Path, duration_s: float) -> Scenario:
    """Write ``source`` to ``out`` on free ports, windows compressed to ``duration_s``.

    Windows are written for a stream from ``LEAD_S`` to ``LEAD_S + FULL_S``; a
    shorter stream maps fleet time ``t`` to ``LEAD_S + (t - LEAD_S) * k`` with
    ``k = duration_s / FULL_S`` (the same events, faster). Returns the scenario as
    the fleet will serve it.
    """
    data = tomllib.loads(source.read_text())
    k = duration_s / FULL_S
    ports = free_ports(len(data["endpoints"]))
    for endpoint, port in zip(data["endpoints"], ports, strict=True):
        endpoint["port"] = port
        for window in endpoint.get("windows", []):
            for key in ("start_s", "end_s"):
                window[key] = max(0.0, LEAD_S + (window[key] - LEAD_S) * k)
            if "every_s" in window:
                window["every_s"] = window["every_s"] * k
    out.write_text(_dump(data))
    return load_scenario(out)


# --- lower bound -------------------------------------------------------------------


def _mean_tokens(endpoint: Endpoint, cap: int) -> float:
    lo, hi = endpoint.output_tokens.min, endpoint.output_tokens.max
    return sum(min(n, cap) for n in range(lo, hi + 1)) / (hi - lo + 1)


def _draw(endpoint: Endpoint, rng: random.Random, cap: int, latency_x: float) -> float:
    z = rng.normalvariate(0.0, 1.0)
    tokens = min(rng.randint(endpoint.output_tokens.min, endpoint.output_tokens.max), cap)
    return (latency_s(endpoint.latency_ms, z) + tokens * endpoint.ms_per_token / 1000) * latency_x


def healthy_reference(scenario: Scenario) -> Endpoint | None:
    """The fastest endpoint that stays healthy all run: no window, fault or capacity."""
    healthy = [
        e
        for e in scenario.endpoints
        if not e.windows
        and e.capacity == 0
        and e.error_rate + e.rate_limit_rate + e.hang_rate + e.malformed_rate == 0
    ]
    return min(healthy, key=lambda e: e.latency_ms.median, default=None)


def lower_bound(scenario: Scenario, jobs: list[Job], seed: int) -> dict[str, list[float]]:
    """Per job: the best endpoint's own latency at its arrival, and the reference's.

    "Best" is the endpoint with the lowest expected time for that job at that
    fleet time (windows applied, down endpoints skipped), unloaded and without
    faults; its latency is drawn from the same lognormal and token distribution
    the fleet uses (independent draws, seeded). ``reference`` is the same for
    :func:`healthy_reference`, the endpoint the 1.5x target compares with.
    """
    rng = random.Random(f"bound:{seed}")
    ref = healthy_reference(scenario)
    ref_rng = random.Random(f"reference:{seed}")
    best: list[float] = []
    reference: list[float] = []
    for job in jobs:
        t = LEAD_S + job.at
        options = []
        for e in scenario.endpoints:
            now = effective(e, t)
            if now.down:
                continue
            mean = (
                e.latency_ms.median / 1000 + _mean_tokens(e, job.max_tokens) * e.ms_per_token / 1000
            )
            options.append((mean * now.latency_x, e, now.latency_x))
        _, endpoint, x = min(options, key=lambda o: o[0])
        best.append(_draw(endpoint, rng, job.max_tokens, x))
        if ref is not None:
            reference.append(_draw(ref, ref_rng, job.max_tokens, 1.0))
    return {"best": best, "reference": reference}


def windows_in_stream(
    scenario: Scenario, duration_s: float
) -> dict[str, list[tuple[float, float, str]]]:
    """Per endpoint, the windows as (start, end, kind) in stream seconds, for plots."""
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for e in scenario.endpoints:
        for w in e.windows:
            kind = "down" if w.down else f"x{w.latency_x:g}"
            period = w.every_s or math.inf
            start = w.start_s
            while start < LEAD_S + duration_s:
                span = (
                    max(0.0, start - LEAD_S),
                    min(duration_s, start + w.end_s - w.start_s - LEAD_S),
                )
                if span[1] > span[0]:
                    spans.setdefault(e.name, []).append((*span, kind))
                start += period
    return spans
