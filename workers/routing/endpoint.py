"""The router's live view of one endpoint: what it costs now, whether it may be used.

Cost of sending a job of ``n`` output tokens (all in seconds)::

    predicted = max(level, oldest_pending_age / p95(n_oldest)) · shape(n)     # success path
              + failure_rate · failure_cost                                    # expected failure
    cost      = predicted · (1 + in_flight / capacity)                         # soft load

* ``level``/``shape``: see :mod:`workers.routing.estimator`.
* The oldest pending request is a lower bound: if it has been running 3× its
  p95 time (``hedge_quantile`` of latency against the prediction it was sent
  with), the endpoint is at least 3× slow now, before any response says so.
  Against its *typical* time instead, the oldest of ten requests in flight —
  often a long answer, whose length was not known when it was sent — reads as
  a slowdown every few seconds and sends jobs to a 2× slower endpoint.
* ``failure_rate · failure_cost``: a fast 5xx costs little (its own latency,
  then a retry elsewhere), a hang costs a whole timeout.
* Load is a distance to capacity, not a queue: LLM servers run requests in
  parallel, so ``(in_flight + 1)`` (Finagle/Linkerd) would spread traffic onto
  slow endpoints. ``capacity`` is ``max_concurrency``, lowered by 429s (AIMD).
* Idle reading: while nothing is in flight, the level reverts toward the
  endpoint's usual self (1.0, time constant ``revert_s``: with no news, a
  slow spell is assumed over within seconds) and fades slowly toward 0
  (``explore_s``, Finagle's "observe 0"), so an endpoint avoided after a
  spike is tried again soon and an endpoint that is merely slower gets a
  probe now and then (first attempts only: a retry or a hedge is late
  already and goes where the router expects it fastest, ``explore=False``);
  the failure term fades toward 0 too. As soon as that probe is in flight
  the stored values apply again, so a recovering endpoint gets one probe, not
  a herd; a probe abandoned as too slow raises the level by what it showed
  (``LatencyEstimator.censor``).
* rpm/tpm are sliding 60-second windows (:class:`~workers.routing.limits.SlidingWindow`):
  ``begin`` counts the request and the reserved tokens (prompt + output cap);
  each attempt keeps its own entries, so what comes back — the unused tokens
  after a success, everything when the connection was refused — leaves the
  window where that attempt put it.
* Cold (no sample yet): its cost is only its failure term (≈ 0), so it is tried
  first (Finagle, Linkerd), but while that probe is in flight it is skipped
  (``Skip.COLD_PROBE``, a capacity reason: jobs wait for a slot rather than
  herd onto an endpoint nobody has heard from). Its ``predicted_s`` is
  ``cold_s``, the fleet's best shape, for deadline checks.
"""

from __future__ import annotations

from math import exp

from workers.routing.config import EndpointSpec, RoutingConfig
from workers.routing.estimator import LatencyEstimator
from workers.routing.failures import FailureKind
from workers.routing.health import Circuit, CircuitState, FailureStats, Unusable
from workers.routing.limits import AimdLimit, Cooldown, Entry, SlidingWindow
from workers.routing.values import EndpointStatus, Skip

__all__ = ["EndpointState", "split"]
_TINY = 1e-9


def _later(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


class EndpointState:
    """Mutable per-endpoint state; ``repr`` shows its health."""

    __slots__ = (
        "_batch",
        "_explored",
        "_fail_busy",
        "_fail_idle",
        "_floor",
        "_gated",
        "_gran",
        "_headroom",
        "_idle_level",
        "_p95",
        "_read_at",
        "_taken",
        "_wait_s",
        "attempts",
        "batch_in_flight",
        "batch_wanted_at",
        "cancelled",
        "capacity",
        "circuit",
        "config",
        "cooldown",
        "failed",
        "failures",
        "in_flight",
        "latency",
        "name",
        "pending",
        "predicted_s",
        "rate_limited",
        "rpm",
        "spec",
        "successes",
        "tpm",
        "unusable",
    )

    def __init__(self, spec: EndpointSpec, config: RoutingConfig) -> None:
        self.spec = spec
        self.name = spec.name
        self.config = config
        self.latency = LatencyEstimator(config)
        self.failures = FailureStats(config)
        self.circuit = Circuit(config)
        self.capacity = AimdLimit(spec.max_concurrency, config.aimd_backoff)
        self.rpm = None if spec.rpm is None else SlidingWindow(spec.rpm)
        self.tpm = None if spec.tpm is None else SlidingWindow(spec.tpm)
        # attempt id -> its own rpm and tpm entries, for refunds to hit that attempt's.
        self._taken: dict[int, tuple[Entry | None, Entry | None]] = {}
        self.in_flight = 0
        self.batch_in_flight = 0
        self._batch: set[int] = set()
        """Attempt ids of batch jobs in flight."""
        self.batch_wanted_at = float("-inf")
        """When a batch pick last found this endpoint full (for the batch floor)."""
        self._wait_s = config.batch_wait_s
        self._headroom = self._floor = self._gated = 0
        self._gates()
        # attempt id -> (started, predicted output tokens, started while idle);
        # insertion order is start order: the first entry is the oldest pending.
        self.pending: dict[int, tuple[float, float, bool]] = {}
        self.cooldown = Cooldown(config)
        self.unusable = Unusable()
        self.predicted_s = 0.0
        self.attempts = self.successes = self.failed = self.rate_limited = self.cancelled = 0
        self._gran = config.decay_granularity_s
        self._read_at = float("-inf")
        self._idle_level = self._explored = 1.0
        self._p95 = 1.0
        self._fail_busy = self._fail_idle = 0.0

    def __repr__(self) -> str:
        lat = self.latency
        return (
            f"<EndpointState {self.name} in_flight={self.in_flight}/{self.capacity.value}"
            f" level={lat.level:.3g} base={lat.base_s:.3g}s per_token={lat.per_token_s:.3g}s"
            f" samples={lat.samples} fail_rate={self.failures.rate:.3f}"
            f" consecutive={self.circuit.consecutive} ejections={self.circuit.ejections}"
            f" open_until={self.circuit.open_until} cooldown_until={self.cooldown.until:.3f}>"
        )

    # --- reading -------------------------------------------------------------

    def blocked(
        self, model: str, now: float, need_tokens: float, *, panic: bool, batch: bool = False
    ) -> Skip | None:
        """Why this endpoint cannot take the job now, or None. Hot path."""
        if self.unusable and self.unusable.until(model, now) is not None:
            return Skip.UNUSABLE
        circuit = self.circuit
        if circuit.open_until is not None and not panic:
            if now < circuit.open_until:
                return Skip.EJECTED
            if circuit.probing:
                return Skip.PROBING
        if now < self.cooldown.until:
            return Skip.COOLDOWN
        busy = self.in_flight
        if busy >= self.capacity.value:
            return Skip.BUSY
        if self.capacity.value != self._gated:
            self._gates()
        below_floor = self.batch_in_flight < self._floor
        if batch:
            # Saturation gate: batch stays off the last slots unless below its floor.
            if not below_floor and busy >= self.capacity.value - self._headroom:
                return Skip.BUSY
        elif below_floor and now - self.batch_wanted_at < self._wait_s:
            # Batch is waiting below its floor: interactive leaves it the floor's slots.
            owed = self._floor - self.batch_in_flight
            if busy >= self.capacity.value - owed:
                return Skip.BUSY
        if self.rpm is not None and not self.rpm.can_take(1.0, now):
            return Skip.RATE_LIMIT
        if self.tpm is not None and not self.tpm.can_take(need_tokens, now):
            return Skip.RATE_LIMIT
        if self.in_flight and not self.latency.samples:
            # Cold: one probe at a time. A start-up burst would otherwise spread
            # over every unknown endpoint, hanging ones included, before any answers.
            return Skip.COLD_PROBE
        return None

    def ejected(self, now: float) -> bool:
        """Ejected and not (yet) admitting its half-open probe."""
        c = self.circuit
        return c.open_until is not None and (now < c.open_until or c.probing)

    def available_at(self, skip: Skip, model: str, now: float, need: float) -> float | None:
        """When ``skip`` stops applying by itself; None when it takes a completion
        (or never frees by itself: an rpm/tpm share of 0)."""
        if skip is Skip.UNUSABLE:
            return self.unusable.until(model, now)
        if skip is Skip.EJECTED:
            return self.circuit.open_until
        if skip is Skip.COOLDOWN:
            return self.cooldown.until
        if skip is Skip.RATE_LIMIT:
            # None from a window: its limit is 0, no time frees it.
            at: float | None = now
            if self.rpm is not None:
                at = _later(at, self.rpm.ready_at(1.0, now))
            if self.tpm is not None:
                at = _later(at, self.tpm.ready_at(need, now))
            return at
        return None

    def score(self, now: float, tokens: float, cold_s: float, *, explore: bool = True) -> float:
        """Cost of sending ``tokens`` output tokens here now; sets ``predicted_s``. Hot path."""
        if now - self._read_at >= self._gran or now < self._read_at:
            self._refresh(now)
        lat = self.latency
        busy = self.in_flight
        if lat.samples:
            level = lat.level if busy else (self._explored if explore else self._idle_level)
            if busy:
                started, old_tokens, _ = next(iter(self.pending.values()))
                usual = (lat.base_s + lat.per_token_s * old_tokens) * self._p95
                floor = (now - started) / max(usual, _TINY)
                if floor > level:
                    level = floor
            predicted = level * (lat.base_s + lat.per_token_s * tokens)
        else:
            predicted = cold_s
            if busy:
                age = now - next(iter(self.pending.values()))[0]
                if age > predicted:
                    predicted = age
        fail = self._fail_busy if busy else self._fail_idle
        predicted += fail
        self.predicted_s = predicted
        if not lat.samples:
            # Finagle: a new endpoint is tried first (cost ≈ 0); once its probe is
            # out, blocked() skips it (COLD_PROBE), so this only serves explain().
            return fail
        return predicted * (1.0 + busy / (self.capacity.value or 1))

    def _refresh(self, now: float) -> None:
        # One exp() per endpoint per decay_granularity_s instead of per pick.
        self._read_at = now
        lat = self.latency
        idle = now - lat.stamp if now > lat.stamp else 0.0
        self._idle_level = lat.reverted(now)
        self._explored = self._idle_level * exp(-idle / self.config.explore_s)
        self._p95 = max(lat.surprise(self.config.hedge_quantile) or 1.0, 1.0)
        f = self.failures
        self._fail_busy = f.rate * f.cost_s
        self._fail_idle = self._fail_busy * f.decay(now)

    def state(self, now: float) -> str:
        if self.unusable and all(self.unusable.until(m, now) is not None for m in self.spec.models):
            return "unusable"
        circuit = self.circuit.state(now)
        if circuit is not CircuitState.CLOSED:
            return circuit.value
        return "cooldown" if now < self.cooldown.until else "closed"

    def status(self, now: float) -> EndpointStatus:
        lat, f, c = self.latency, self.failures, self.circuit
        state = self.state(now)
        available = {"open": c.open_until, "cooldown": self.cooldown.until}.get(state)
        return EndpointStatus(
            name=self.name,
            state=state,
            in_flight=self.in_flight,
            capacity=self.capacity.value,
            max_concurrency=self.spec.max_concurrency,
            predicted_s=self.predicted_s if lat.samples else None,
            level=lat.level,
            base_s=lat.base_s,
            per_token_s=lat.per_token_s,
            samples=lat.samples,
            failure_rate=f.rate,
            failure_cost_s=f.cost_s,
            consecutive_failures=c.consecutive,
            ejections=c.ejections,
            attempts=self.attempts,
            successes=self.successes,
            failures=self.failed,
            rate_limited=self.rate_limited,
            cancelled=self.cancelled,
            available_at=available,
            unusable_models=self.unusable.models(now),
        )

    def _gates(self) -> None:
        """Batch's headroom and floor for the capacity now (learned, or the fleet share)."""
        k = self._gated = self.capacity.value
        c = self.config
        if k < 2:  # one slot: nothing to keep back on either side
            self._headroom = self._floor = 0
            return
        self._headroom = max(1, round(k * c.batch_headroom)) if c.batch_headroom else 0
        self._floor = min(k - 1, max(1, int(k * c.batch_floor))) if c.batch_floor else 0

    def share(self, index: int, count: int, now: float) -> None:
        """Hold share ``index`` of ``count`` of this endpoint's limits (``count``
        live workers, this one ranked ``index``): the shares add up to exactly the
        configured ``max_concurrency``, ``rpm`` and ``tpm``. A lower rpm/tpm share
        applies at once, a higher one after a whole window (``SlidingWindow.set_limit``)."""
        spec = self.spec
        self.capacity.rescale(split(spec.max_concurrency, index, count))
        if self.rpm is not None and spec.rpm is not None:
            self.rpm.set_limit(split(spec.rpm, index, count), now)
        if self.tpm is not None and spec.tpm is not None:
            self.tpm.set_limit(split(spec.tpm, index, count), now)

    def leave(self, others_rpm: float | None, others_tpm: float | None) -> None:
        """Cap this worker's windows at what the other live workers leave of the
        endpoint's rpm/tpm: ``others_*`` is, summed over them, the larger of each
        one's share and what its window reported holding (None: no peers). A
        worker that joins thus sends only what the others' windows have room for,
        and its share once their old requests have aged out."""
        spec = self.spec
        if self.rpm is not None and spec.rpm is not None:
            self.rpm.cap = float("inf") if others_rpm is None else max(0.0, spec.rpm - others_rpm)
        if self.tpm is not None and spec.tpm is not None:
            self.tpm.cap = float("inf") if others_tpm is None else max(0.0, spec.tpm - others_tpm)

    def window_use(self, now: float) -> tuple[float | None, float | None]:
        """What this worker's rpm and tpm windows hold now (None: no such limit)."""
        return (
            None if self.rpm is None else self.rpm.used(now),
            None if self.tpm is None else self.tpm.used(now),
        )

    # --- writing -------------------------------------------------------------

    def begin(
        self, attempt_id: int, now: float, tokens: float, reserve: float, *, batch: bool = False
    ) -> bool:
        """An attempt starts; returns True when it is the half-open probe."""
        self.pending[attempt_id] = (now, tokens, not self.in_flight)
        if batch:
            self._batch.add(attempt_id)
            self.batch_in_flight += 1
        self.in_flight += 1
        self.attempts += 1
        if self.rpm is not None or self.tpm is not None:
            self._taken[attempt_id] = (
                None if self.rpm is None else self.rpm.take(1.0, now),
                None if self.tpm is None else self.tpm.take(reserve, now),
            )
        return self.circuit.on_begin(now)

    def _release(self, attempt_id: int, *, request: bool, tokens: float) -> None:
        """Forget the attempt's rpm/tpm entries, first returning its request and ``tokens``."""
        taken = self._taken.pop(attempt_id, None)
        if taken is None:
            return
        rpm, tpm = taken
        if request and rpm is not None and self.rpm is not None:
            self.rpm.give(rpm, 1.0)
        if tokens > 0 and tpm is not None and self.tpm is not None:
            self.tpm.give(tpm, tokens)

    def _finish(self, attempt_id: int) -> tuple[float, float, bool] | None:
        entry = self.pending.pop(attempt_id, None)
        if entry is None:
            return None  # already finished: a hedge race or a double call
        self.in_flight -= 1
        if self._batch and attempt_id in self._batch:
            self._batch.discard(attempt_id)
            self.batch_in_flight -= 1
        self._read_at = float("-inf")
        return entry

    def succeed(
        self,
        attempt_id: int,
        now: float,
        *,
        started: float,
        tokens: float,
        unused_tokens: float,
        probe: bool,
    ) -> bool:
        """Record a success; False when the attempt had already finished."""
        busy = self.in_flight
        entry = self._finish(attempt_id)
        if entry is None:
            return False
        self.successes += 1
        self.cooldown.streak = 0  # the 429 doubling starts over
        began, predicted, idle = entry
        self.latency.observe(now - started, tokens, now, predicted, began if idle else None)
        self.failures.observe(now, failed=False)
        if self.circuit.on_success(now, probe):
            self.failures.reset()
        self.capacity.on_success(busy)
        self._release(attempt_id, request=False, tokens=unused_tokens)
        return True

    def fail(
        self,
        attempt_id: int,
        kind: FailureKind,
        now: float,
        *,
        started: float,
        model: str | None,
        probe: bool,
        jitter: float,
        retry_after_s: float | None,
        reserved: float,
    ) -> None:
        busy = self.in_flight
        if self._finish(attempt_id) is None:
            return
        refused = kind is FailureKind.REFUSED  # never reached the upstream's limiter
        self._release(attempt_id, request=refused, tokens=reserved if refused else 0.0)
        if kind.endpoint_failure:
            self.failed += 1
            self.failures.observe(now, failed=True, elapsed_s=now - started)
            self.circuit.on_failure(now, probe=probe, jitter=jitter, stats=self.failures)
            if retry_after_s is not None:  # a 503 that says when to come back
                self.cooldown.hold(now, retry_after_s, jitter)
            return
        self.circuit.on_cancel(probe)  # the probe did not test health
        if kind is FailureKind.RATE_LIMITED:
            self.rate_limited += 1
            if busy < 2 or not self.capacity.on_rate_limited(busy):
                self.cooldown.rate_limited(now, retry_after_s, jitter)
        elif kind.marks_unusable:
            self.unusable.mark(model, now + self.config.auth_unusable_s)

    def cancel(self, attempt_id: int, now: float, *, probe: bool) -> None:
        entry = self._finish(attempt_id)
        if entry is not None:
            self._release(attempt_id, request=False, tokens=0.0)
            self.cancelled += 1
            self.circuit.on_cancel(probe)
            started, tokens, idle = entry
            self.latency.censor(now - started, tokens, now, started if idle else None)


def split(total: int, index: int, count: int) -> int:
    """Share ``index`` of ``total`` split ``count`` ways; the shares sum to ``total``."""
    if count <= 1:
        return total
    base, extra = divmod(total, count)
    return base + (1 if index < extra else 0)
