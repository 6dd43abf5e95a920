"""Per-endpoint counters, read by tests and benchmarks through ``/fleet/stats``.

The counters are what a test cannot see from its side of the socket: how many
requests were in flight at once (capacity), how many hung, how many clients
gave up before the answer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EndpointStats"]


@dataclass(slots=True)
class EndpointStats:
    """Counters since start or the last reset, and two live gauges."""

    requests: int = 0
    """Requests to ``/v1/*`` (``/fleet/*`` is not counted)."""
    by_status: dict[int, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    """Chat completions by planned outcome (ok, error, hang, ...) plus over_capacity."""
    in_flight: int = 0
    """Gauge: completions holding a capacity slot (queued ones are not counted)."""
    max_in_flight: int = 0
    queued: int = 0
    """Gauge: completions waiting for a slot (``over_capacity = "queue"``)."""
    hangs: int = 0
    dropped: int = 0
    """Completions whose client went away before the answer (hangs not counted),
    streams whose client went away before their end included."""
    streams: int = 0
    """Streamed answers begun (a 200 event stream, malformed and cut ones included)."""
    cut: int = 0
    """Streams cut mid-way by ``stream_cut_rate``."""
    max_per_minute: int = 0
    """Most requests that arrived within any 60 seconds (what a provider's rpm counts)."""
    _arrivals: deque[float] = field(default_factory=deque, repr=False)

    def arrive(self, now: float) -> None:
        """Count one request arriving at ``now`` (monotonic seconds)."""
        self.requests += 1
        arrivals = self._arrivals
        arrivals.append(now)
        while arrivals[0] <= now - 60.0:
            arrivals.popleft()
        if len(arrivals) > self.max_per_minute:
            self.max_per_minute = len(arrivals)

    def status(self, code: int) -> None:
        """Count one answer with HTTP status ``code``."""
        self.by_status[code] = self.by_status.get(code, 0) + 1

    def outcome(self, name: str) -> None:
        """Count one completion by what it got."""
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def enter(self) -> None:
        """A completion takes a slot."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def reset(self) -> None:
        """Zero the counters; the gauges keep their live values."""
        self.requests = self.hangs = self.dropped = self.max_per_minute = 0
        self.streams = self.cut = 0
        self._arrivals.clear()
        self.by_status = {}
        self.outcomes = {}
        self.max_in_flight = self.in_flight

    def snapshot(self) -> EndpointStats:
        """A copy that later requests do not change."""
        return EndpointStats(
            requests=self.requests,
            by_status=dict(self.by_status),
            outcomes=dict(self.outcomes),
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            queued=self.queued,
            hangs=self.hangs,
            dropped=self.dropped,
            streams=self.streams,
            cut=self.cut,
            max_per_minute=self.max_per_minute,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (status codes become string keys)."""
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "outcomes": dict(sorted(self.outcomes.items())),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "queued": self.queued,
            "hangs": self.hangs,
            "dropped": self.dropped,
            "streams": self.streams,
            "cut": self.cut,
            "max_per_minute": self.max_per_minute,
        }
