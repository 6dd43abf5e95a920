"""Worker state over the broker: what each worker sees, shared about once a second.

Every worker publishes a small JSON message on the fanout exchange
``topology.state_exchange`` (``llmq.state``) each ``worker.state_interval_s``
and reads everyone's through its own exclusive, auto-delete queue. One
channel carries three things:

* **status** for ``llmq status``: in-flight, ok/error counters, and per
  endpoint the circuit state, in-flight, predicted cost, share of traffic
  and the failure kinds of the last ``window`` intervals;
* **health**: an endpoint this worker ejected itself is announced with the
  time left (``ejected_for_s``); peers hold it open as long
  (``Router.observe_remote``), so the whole fleet avoids it within about one
  interval. Holds learned from peers are not re-announced (no echo);
* **spend** for budgets (``workers.routing.spend``: a G-counter per budget).

State messages are lossy by design (no confirms, short TTL): the next one
supersedes a lost one. docs/observability.md describes the message. This
module is the message (:class:`StateBook` builds it, :func:`decode_state`
reads it); ``workers/gossip.py`` sends and hears it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import orjson

from workers.events import AttemptDone, Event
from workers.routing import EndpointStatus

__all__ = ["STATE_VERSION", "StateBook", "decode_state"]

log = logging.getLogger("llmq.worker")

STATE_VERSION = 1
_NOT_FAILURES = frozenset({"ok", "cancelled"})


def decode_state(body: bytes) -> dict[str, Any] | None:
    """A state message as a dict, or None when it is not one this code understands."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("v") != STATE_VERSION:
        return None
    if not isinstance(data.get("origin"), str):
        return None
    return data


class StateBook:
    """Builds this worker's state message and reads the peers'; a Hook for failure kinds.

    Time is the router's clock (monotonic seconds), passed in.
    """

    def __init__(self, *, origin: str, worker: str, window: int = 30) -> None:
        self.origin = origin
        self.worker = worker
        self._window = window
        self._errors: deque[dict[str, dict[str, int]]] = deque([{}], maxlen=window)
        self._attempts: deque[dict[str, int]] = deque(maxlen=window)
        self._last_attempts: dict[str, int] = {}
        self._ejections: dict[str, int] = {}
        self._own_until: dict[str, float] = {}
        self._remote_until: dict[str, float] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, AttemptDone) and event.outcome not in _NOT_FAILURES:
            bucket = self._errors[-1].setdefault(event.endpoint, {})
            bucket[event.outcome] = bucket.get(event.outcome, 0) + 1

    def build(
        self,
        *,
        statuses: list[EndpointStatus],
        status: Mapping[str, Any],
        now: float,
        interval_s: float,
        spend: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """This worker's state now; advances the recent-history window by one interval."""
        deltas: dict[str, int] = {}
        for s in statuses:
            deltas[s.name] = s.attempts - self._last_attempts.get(s.name, 0)
            self._last_attempts[s.name] = s.attempts
            ejected = s.ejections > self._ejections.get(s.name, 0)
            if ejected and s.state == "open" and s.available_at is not None:
                # Ejected by this worker since the last message (not a peer's hold).
                self._own_until[s.name] = s.available_at
            self._ejections[s.name] = s.ejections
        self._attempts.append(deltas)
        recent: dict[str, int] = {}
        for d in self._attempts:
            for name, n in d.items():
                recent[name] = recent.get(name, 0) + n
        total = sum(recent.values())
        endpoints = []
        for s in statuses:
            errors: dict[str, int] = {}
            for bucket in self._errors:
                for kind, n in bucket.get(s.name, {}).items():
                    errors[kind] = errors.get(kind, 0) + n
            until = self._own_until.get(s.name)
            endpoints.append(
                {
                    "name": s.name,
                    "state": s.state,
                    "in_flight": s.in_flight,
                    "capacity": s.capacity,
                    "predicted_s": s.predicted_s,
                    "failure_rate": round(s.failure_rate, 6),
                    "share": round(recent.get(s.name, 0) / total, 4) if total else 0.0,
                    "recent_attempts": recent.get(s.name, 0),
                    "attempts": s.attempts,
                    "errors": errors,
                    "ejected_for_s": round(until - now, 3)
                    if until is not None and until > now
                    else None,
                }
            )
        self._errors.append({})
        return {
            "v": STATE_VERSION,
            "origin": self.origin,
            "worker": self.worker,
            "sent_at": round(time.time(), 3),
            "interval_s": interval_s,
            "window_s": round(interval_s * len(self._attempts), 3),
            "in_flight": status.get("in_flight", 0),
            "ok": status.get("ok", 0),
            "errors": status.get("errors", 0),
            "dead_letters": status.get("dead_letters", 0),
            "requeued": status.get("requeued", 0),
            "by_code": dict(status.get("by_code", {})),
            "endpoints": endpoints,
            "spend": spend,
        }

    def remote_ejections(self, state: Mapping[str, Any], *, now: float) -> list[tuple[str, float]]:
        """``(endpoint, seconds)`` a peer ejected; each new one is logged once."""
        found: list[tuple[str, float]] = []
        endpoints = state.get("endpoints")
        if not isinstance(endpoints, list):
            return found
        for e in endpoints:
            if not isinstance(e, dict):
                continue
            name, left = e.get("name"), e.get("ejected_for_s")
            if not isinstance(name, str) or not isinstance(left, int | float) or left <= 0:
                continue
            found.append((name, float(left)))
            if now + left > self._remote_until.get(name, float("-inf")) + 1.0:
                log.info(
                    "endpoint %s ejected by worker %s for %.1f s: avoiding it here too",
                    name,
                    state.get("worker"),
                    left,
                    extra={"endpoint": name, "peer": state.get("worker")},
                )
            self._remote_until[name] = max(self._remote_until.get(name, 0.0), now + left)
        return found
