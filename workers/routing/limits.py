"""Capacity limits of one endpoint: rpm/tpm windows, learned concurrency, 429 cooldown.

All are driven by the caller's clock: a window forgets what is older than 60 s
as of the ``now`` it is given, never from a timer.
"""

from __future__ import annotations

from collections import deque

from workers.routing.config import RoutingConfig

__all__ = ["WINDOW_S", "AimdLimit", "Cooldown", "Entry", "SlidingWindow"]

WINDOW_S = 60.0
"""Providers count requests and tokens over any 60-second window."""
_EMPTY = 1e-9
"""A window whose entries sum to at most this holds nothing (float residue of refunds)."""


class Entry:
    """One take in a :class:`SlidingWindow`: the handle to refund it through."""

    __slots__ = ("amount", "time")

    def __init__(self, time: float, amount: float) -> None:
        self.time = time
        self.amount = amount
        """What still counts; 0 once refunded or out of the window."""

    def __repr__(self) -> str:
        return f"<Entry {self.amount:g} at {self.time:.3f}>"


class SlidingWindow:
    """At most ``limit`` requests (or tokens) in any ``window_s``-second window.

    Guarantee: for every ``t``, the entries taken in ``(t − 60, t]`` sum to at
    most the limit in force (see below), provided each :meth:`take` follows a
    :meth:`can_take` that said yes at the same ``now`` — the router's pick and
    begin are one step. One exception, so that a job is not refused forever: a
    single request larger than the whole limit (a 50k-token prompt against tpm
    40k) is admitted into an empty window, which then stays shut until that
    entry leaves it, 60 s later. The window starts empty: a fresh worker may
    send the whole limit in its first minute, not twice it (a token bucket that
    starts full and refills continuously lets ``2 × rpm`` through).

    Limits move with the fleet (:meth:`set_limit`, a worker's share of the
    endpoint's limit): a decrease applies at once, an increase only once the
    lower limit has held for a whole window — the limit in force is the
    smallest one set at any time in the last 60 s. So when one worker's share
    falls as another's rises, the rise waits until the first worker's window
    no longer holds its old share, and the sum over workers holds in every
    window. A worker that joins should start at 0 and raise to its share (it
    then sends after 60 s); a limit of 0 admits nothing.

    Entries live in a deque in time order with a running sum: a take appends,
    time expires from the left, so each entry is added and dropped once —
    O(1) amortised, for rpm in the tens of thousands. Time that goes backwards
    is read as the latest time seen.
    """

    __slots__ = ("_entries", "_history", "_set", "_stamp", "_window", "cap", "limit", "total")

    def __init__(self, limit: float, window_s: float = WINDOW_S) -> None:
        self._window = window_s
        self._set = float(limit)
        """The limit last set."""
        self.limit = self._set
        """The limit in force: the smallest set at any time in the last window."""
        self._history: deque[tuple[float, float]] = deque()
        """(until, limit) of earlier limits, kept only while they may be the smallest:
        ``until`` and ``limit`` both increase left to right."""
        self._entries: deque[Entry] = deque()
        self.total = 0.0
        """Sum of the entries' amounts (those in the window as of the latest ``now``)."""
        self._stamp = float("-inf")
        self.cap = float("inf")
        """What the other workers' windows leave (``EndpointState.leave``): applies
        at once, both ways, on top of ``limit``; revised by each state message."""

    def __repr__(self) -> str:
        return f"<SlidingWindow {self.total:.1f}/{self.limit:.0f} per {self._window:g}s>"

    def _advance(self, now: float) -> None:
        """Drop what left the window by ``now`` (> the latest time seen)."""
        self._stamp = now
        cutoff = now - self._window
        entries = self._entries
        if entries and entries[0].time <= cutoff:
            while entries and entries[0].time <= cutoff:
                gone = entries.popleft()
                self.total -= gone.amount
                gone.amount = 0.0  # a refund through this handle now changes nothing
            if not entries:
                self.total = 0.0  # no float residue in an empty window
        history = self._history
        if history and history[0][0] <= cutoff:
            while history and history[0][0] <= cutoff:
                history.popleft()
            self.limit = min(self._set, history[0][1]) if history else self._set

    def _fits(self, need: float, total: float, limit: float) -> bool:
        if need <= limit - total:
            return True
        return need > limit > 0 and total <= _EMPTY  # too big for any window: an empty one

    def can_take(self, need: float, now: float) -> bool:
        """Whether ``need`` fits now. Runs on every pick: O(1) amortised, and changes
        nothing a caller can see (it only drops entries that have left the window)."""
        if now > self._stamp:
            self._advance(now)
        limit = self.limit if self.limit <= self.cap else self.cap
        return self._fits(need, self.total, limit)

    @property
    def shut(self) -> bool:
        """The limit set is 0: nothing is admitted until another is set (``ready_at`` None)."""
        return self._set <= 0

    def used(self, now: float) -> float:
        """What the window holds now."""
        if now > self._stamp:
            self._advance(now)
        return self.total

    def take(self, need: float, now: float) -> Entry:
        """Count ``need`` at ``now``; returns the entry, to :meth:`give` back part of it.

        Does not check: the caller asked :meth:`can_take` first."""
        if now > self._stamp:
            self._advance(now)
        entry = Entry(self._stamp, max(need, 0.0))
        self._entries.append(entry)
        self.total += entry.amount
        return entry

    def give(self, entry: Entry, amount: float) -> None:
        """Stop counting ``amount`` of ``entry`` (never more than it still counts)."""
        amount = min(max(amount, 0.0), entry.amount)
        entry.amount -= amount
        self.total -= amount

    def ready_at(self, need: float, now: float) -> float | None:
        """When ``need`` fits, if nothing else is taken or set; None: never (limit 0).

        Walks entries and earlier limits in the order they leave the window: only
        called when a pick found nothing, and it stops at the first time that fits.
        """
        if now > self._stamp:
            self._advance(now)
        now = self._stamp
        if self.cap < self.limit and not self._fits(need, self.total, self.cap):
            # The other workers' windows hold the rest: their next state message
            # (about a second) says what has left them.
            return now + 1.0
        total, limit = self.total, self.limit
        entries, history, window = self._entries, self._history, self._window
        i = j = 0
        t = now
        while not self._fits(need, total, limit):
            left = entries[i].time + window if i < len(entries) else float("inf")
            lifted = history[j][0] + window if j < len(history) else float("inf")
            if left == lifted == float("inf"):
                return None
            if left <= lifted:
                total -= entries[i].amount
                i += 1
                t = left
            else:
                j += 1
                limit = min(self._set, history[j][1]) if j < len(history) else self._set
                t = lifted
        return max(t, now)

    def set_limit(self, limit: float, now: float) -> None:
        """A new limit (this worker's share): lower at once, higher after a window."""
        if now > self._stamp:
            self._advance(now)
        old, limit = self._set, float(limit)
        if limit == old:
            return
        history = self._history
        while history and history[-1][1] >= old:
            history.pop()  # ends sooner and is no smaller: never the smallest again
        history.append((self._stamp, old))
        self._set = limit
        self.limit = min(limit, history[0][1])


class AimdLimit:
    """Concurrency the endpoint tolerates, learned from 429s.

    Starts at the configured ``max_concurrency`` and never exceeds it. A 429
    that arrives while ``k ≥ 2`` requests were in flight says the endpoint
    took ``k − 1`` and refused the ``k``-th — if it was about concurrency.
    It was not when a request recently *succeeded* with ``k`` or more in
    flight (``proven``): that 429 is a shed or a rate limit, and only lowers
    ``proven`` by one (so a capacity that shrinks is learned after a few), and
    :meth:`on_rate_limited` returns False for the caller to treat it as one.
    Otherwise the limit drops toward ``k − 1``, by at most a factor
    ``backoff`` per 429 (TCP: halve), always by at least 1, never below 1: a
    real limit is found in a few 429s instead of the dozens a ×0.9 cut takes.
    Growth is additive per window (TCP Reno: ``+1/limit`` per success while at
    least half the limit is in use), so probing above a learned limit costs
    about one 429 per ``limit`` successes.
    """

    __slots__ = ("_backoff", "ceiling", "limit", "proven", "value")

    def __init__(self, ceiling: int, backoff: float) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.value = ceiling
        """The limit as a whole number of requests (an attribute: read on every pick)."""
        self.proven = 0
        """Most requests in flight (the one answered included) at a recent success."""
        self._backoff = backoff

    def __repr__(self) -> str:
        return f"<AimdLimit {self.value}/{self.ceiling} proven={self.proven}>"

    def on_rate_limited(self, in_flight: int) -> bool:
        """A 429 with ``in_flight`` requests out, this one included; True if a concurrency limit."""
        if in_flight <= self.proven:
            self.proven -= 1
            return False
        cut = max(float(in_flight - 1), self.limit * self._backoff)
        self.limit = max(1.0, min(self.limit - 1.0, cut))
        self.value = max(1, int(self.limit)) if self.ceiling else 0
        return True

    def on_success(self, in_flight: int) -> None:
        if in_flight > self.proven:
            self.proven = in_flight
        if in_flight * 2 >= self.limit and self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + 1.0 / self.limit)
            self.value = max(1, int(self.limit))

    def rescale(self, ceiling: int) -> None:
        """A new ceiling (this worker's share of the fleet's ``max_concurrency``).

        What 429s taught is kept as a fraction of the ceiling: a worker that had
        learned half of its share keeps half of its new share. A ceiling of 0
        (more workers than slots) admits nothing.
        """
        if ceiling == self.ceiling:
            return
        fraction = self.limit / self.ceiling if self.ceiling else 1.0
        self.ceiling = ceiling
        self.limit = max(min(1.0, float(ceiling)), fraction * ceiling)
        self.value = int(self.limit) if ceiling else 0
        self.proven = min(self.proven, ceiling)


class Cooldown:
    """Time out after repeated 429s (or a 503 that says when to come back).

    Only 429s that are not a concurrency limit count here (nothing else in
    flight, or as many in flight as recently succeeded: see :class:`AimdLimit`),
    and only from the ``cooldown_after``-th in a row
    without a success between: a lone 429 is as often load shedding as a rate
    limit, and costs one fast round trip, while cooling the endpoint down
    costs every job its latency for a second or more. ``Retry-After`` is
    honoured up to ``retry_after_cap_s`` and stretched by ×U[1, 1 + cooldown_jitter]
    (Envoy: ×U[1, 1.5]) so that workers told the same value do not come back
    together. Without a value, the wait starts at ``cooldown_default_s`` and
    doubles per further 429, up to ``cooldown_default_cap_s``; a success resets
    the streak.
    """

    __slots__ = ("_after", "_cap", "_default", "_default_cap", "_jitter", "streak", "until")

    def __init__(self, config: RoutingConfig) -> None:
        self._after = config.cooldown_after
        self._cap = config.retry_after_cap_s
        self._jitter = config.cooldown_jitter
        self._default = config.cooldown_default_s
        self._default_cap = config.cooldown_default_cap_s
        self.streak = 0
        self.until = 0.0

    def __repr__(self) -> str:
        return f"<Cooldown until={self.until:.3f} streak={self.streak}>"

    def rate_limited(self, now: float, retry_after_s: float | None, jitter: float) -> None:
        """A 429 with nothing else in flight."""
        self.streak += 1
        if self.streak < self._after:
            return
        if retry_after_s is None:
            doublings = min(self.streak - self._after, 60)
            retry_after_s = min(self._default * 2.0**doublings, self._default_cap)
        self.hold(now, retry_after_s, jitter)

    def hold(self, now: float, retry_after_s: float, jitter: float) -> None:
        """Cool down for ``retry_after_s`` (capped, jittered by ``jitter`` in [0, 1))."""
        wait = min(max(retry_after_s, 0.0), self._cap)
        self.until = max(self.until, now + wait * (1.0 + self._jitter * jitter))
