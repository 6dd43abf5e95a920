"""The router: which endpoint gets a job, and what each attempt taught us.

Pure and synchronous: the caller passes the clock (``now``, monotonic
seconds) and randomness (``rand() -> [0, 1)``) and does all I/O. One Router
per worker process; it is not thread-safe (the worker is one event loop).

Per job: ``pick`` → ``begin`` → one of ``succeed`` / ``fail`` / ``cancel``.

Models: a name may be an alias. ``pick`` walks the model's chain — the model,
then its ``fallbacks`` — past every step that is unusable (no endpoint it may
use for a health reason: ejected, probing, cooling down, unusable), and stops
at the first that is usable (a ``Choice``) or only at capacity (an endpoint
full, out of rpm/tpm for now, or with its cold probe out): a job waits for
its own model (``NoChoice`` OVER_CAPACITY, which the dispatcher waits on)
rather than being served by a fallback because the model is busy. When the
requested model itself is at capacity, its ``overflow_to`` models are tried
first, in order. ``Choice.via`` says which way the model was reached.
Endpoints a retry or hedge excludes are neither usable nor capacity: a model
whose other endpoints are down falls back. See :mod:`catalog`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from schemas.errors import ErrorCode
from workers.routing import timeouts
from workers.routing.catalog import Catalog
from workers.routing.config import EndpointSpec, ModelRules, RoutingConfig, Work
from workers.routing.endpoint import EndpointState, split
from workers.routing.failures import FailureKind
from workers.routing.policy import LatencyPolicy, Policy
from workers.routing.values import (
    FALLBACK,
    OVERFLOW,
    Attempt,
    Candidate,
    Choice,
    EndpointStatus,
    NoChoice,
    Skip,
)
from workers.routing.workload import Workload

__all__ = ["Router"]


def _half() -> float:
    return 0.5


def _waits_for(state: EndpointState, skip: Skip) -> bool:
    """Whether ``skip`` is capacity that comes back by itself or on a completion.

    A share of 0 (more workers than the endpoint's slots, or an rpm/tpm share of 0)
    never does: for this worker that endpoint is as good as down."""
    if skip is Skip.BUSY:
        return state.capacity.value > 0
    if skip is Skip.RATE_LIMIT:
        rpm, tpm = state.rpm, state.tpm
        return not ((rpm is not None and rpm.shut) or (tpm is not None and tpm.shut))
    return skip is Skip.COLD_PROBE


class Router:
    """Routing state of every endpoint of one worker."""

    def __init__(
        self,
        endpoints: Sequence[EndpointSpec],
        models: Mapping[str, ModelRules] | None = None,
        config: RoutingConfig | None = None,
        policy: Policy | None = None,
        *,
        rand: Callable[[], float] | None = None,
    ) -> None:
        """Build the routing tables; raises ValueError on an inconsistent configuration.

        ``rand`` jitters ejection and cooldown times (pass ``random.random``);
        without it they are not jittered, which only matters across workers.
        """
        self.config = config if config is not None else RoutingConfig()
        self.policy: Policy = policy if policy is not None else LatencyPolicy()
        self._rand = rand if rand is not None else _half
        self._states: dict[str, EndpointState] = {}
        self._serving: dict[str, list[tuple[EndpointState, str]]] = {}
        for spec in endpoints:
            if spec.name in self._states:
                raise ValueError(f"endpoint name {spec.name!r} is used twice")
            state = EndpointState(spec, self.config)
            self._states[spec.name] = state
            for model, upstream in spec.models.items():
                self._serving.setdefault(model, []).append((state, upstream))
        self.catalog = Catalog(self._serving, models or {})
        self.workload = Workload(self.config)
        self._costs: list[float] = []
        self._eligible: list[tuple[EndpointState, str]] = []
        self._next_id = 0

    def __repr__(self) -> str:
        return (
            f"<Router endpoints={len(self._states)} models={len(self._serving)}"
            f" policy={self.policy.name}>"
        )

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._states)

    def resolve(self, model: str) -> str | None:
        """The canonical name of a model or alias; None when nothing serves it."""
        return self.catalog.canonical(model)

    # --- choosing ----------------------------------------------------------------

    def pick(
        self,
        model: str,
        *,
        work: Work,
        now: float,
        rand: Callable[[], float],
        exclude: frozenset[str] = frozenset(),
    ) -> Choice | NoChoice:
        """The endpoint for ``work`` now: the model's; when it is at capacity, an
        overflow model's or none (wait); when it is unusable, a fallback's."""
        catalog = self.catalog
        chain = catalog.chain(model)
        if chain is None:
            return NoChoice(ErrorCode.UNKNOWN_MODEL, f"no endpoint serves model {model!r}", None)
        # Panic (route over ejected endpoints) is for a model with some endpoint
        # left, or, once the whole chain is down, a last resort: a model whose
        # endpoints are all ejected is down, and its fallbacks come first (as
        # Envoy spills to lower priorities before it panics).
        for last_resort in (False, True):
            picked = self._walk(model, chain, work, now, rand, exclude, last_resort)
            if picked is not None:
                return picked
        return self._no_choice(chain, work, now, exclude, last_resort=True)

    def _walk(
        self,
        model: str,
        chain: Sequence[str],
        work: Work,
        now: float,
        rand: Callable[[], float],
        exclude: frozenset[str],
        last_resort: bool,
    ) -> Choice | NoChoice | None:
        """Along the chain past unusable steps: a Choice, a NoChoice to wait for a
        step at capacity (after its overflow models), or None: all unusable."""
        own = self.catalog.canonical(model)
        for i, name in enumerate(chain):
            via = None if name == own else FALLBACK
            picked = self._pick_model(name, work, now, rand, exclude, via, last_resort)
            if isinstance(picked, Choice):
                return picked
            if picked:  # only at capacity: wait for this step, do not fall further
                considered = chain[: i + 1]
                if name == own:
                    spills = self.catalog.overflow(model)
                    for spill in spills:
                        choice = self._pick_model(
                            spill, work, now, rand, exclude, OVERFLOW, last_resort
                        )
                        if isinstance(choice, Choice):
                            return choice
                    considered = tuple(dict.fromkeys((*considered, *spills)))
                return self._no_choice(considered, work, now, exclude, last_resort=last_resort)
        return None

    def _pick_model(
        self,
        model: str,
        work: Work,
        now: float,
        rand: Callable[[], float],
        exclude: frozenset[str],
        via: str | None,
        last_resort: bool,
    ) -> Choice | bool:
        """A Choice among the model's endpoints, else whether the model is only at
        capacity (some endpoint not excluded is blocked by :attr:`Skip.full` alone)."""
        entries = self._serving[model]
        workload = self.workload
        tokens = workload.tokens(model, work)
        need = workload.reserve(work)
        cold = workload.cold_s(model, now, tokens, entries)
        costs, eligible = self._costs, self._eligible
        costs.clear()
        eligible.clear()
        ejected = live = 0
        full = False
        for entry in entries:
            state = entry[0]
            if exclude and state.name in exclude:
                ejected += state.ejected(now)
                continue
            skip = state.blocked(model, now, need, panic=False, batch=work.batch)
            if skip is None:
                costs.append(state.score(now, tokens, cold, explore=not exclude))
                eligible.append(entry)
                live += 1
            elif state.ejected(now):
                ejected += 1
            else:
                live += 1
                if skip is Skip.BUSY and work.batch:
                    state.batch_wanted_at = now
                if not full and skip.full:
                    full = _waits_for(state, skip)
        if ejected > self.config.max_eject_fraction * len(entries) and (live or last_resort):
            # Panic (Envoy): with most endpoints ejected, health says more about
            # the observer than the fleet; route over them all.
            for entry in entries:
                state = entry[0]
                if not state.ejected(now) or (exclude and state.name in exclude):
                    continue
                skip = state.blocked(model, now, need, panic=True, batch=work.batch)
                if skip is None:
                    costs.append(state.score(now, tokens, cold, explore=not exclude))
                    eligible.append(entry)
                elif not full and skip.full:
                    full = _waits_for(state, skip)
        if not costs:
            return full
        state, upstream = eligible[self.policy.choose(costs, rand)]
        return Choice(state.name, model, upstream, state.predicted_s, via)

    def _panic(self, model: str, now: float, exclude: frozenset[str], last_resort: bool) -> bool:
        """Whether ``_pick_model`` routes over the model's ejected endpoints too."""
        entries = self._serving[model]
        ejected = live = 0
        for state, _ in entries:
            if state.ejected(now):
                ejected += 1
            elif state.name not in exclude:
                live += 1
        return ejected > self.config.max_eject_fraction * len(entries) and bool(live or last_resort)

    def _no_choice(
        self,
        chain: Sequence[str],
        work: Work,
        now: float,
        exclude: frozenset[str],
        *,
        last_resort: bool,
    ) -> NoChoice:
        capacity = on_completion = False
        configured_wrong = True
        retry_at: float | None = None
        parts: list[str] = []
        need = self.workload.reserve(work)
        candidates = self._candidates(chain, work, now, exclude, last_resort)
        # pick() just found every candidate blocked; the filter only satisfies the types.
        for candidate, skip in [(c, Skip(c.skip)) for c in candidates if c.skip is not None]:
            capacity = capacity or skip.capacity
            configured_wrong = configured_wrong and skip is Skip.UNUSABLE
            on_completion = on_completion or skip in (Skip.BUSY, Skip.COLD_PROBE)
            state = self._states[candidate.name]
            at = state.available_at(skip, candidate.model, now, need)
            if at is not None and (retry_at is None or at < retry_at):
                retry_at = at
            parts.append(f"{candidate.name}={skip.value}")
        reason = f"no usable endpoint for {'/'.join(chain)}: {', '.join(parts)}"
        if capacity:
            code = ErrorCode.OVER_CAPACITY
        elif configured_wrong and parts:
            # Every endpoint answered 401/403/404 for the model: llmq's own
            # configuration is wrong, not the provider down. Retrying will not
            # help until an operator fixes it, so the caller must not be told to.
            code = ErrorCode.UPSTREAM_REJECTED
            reason += " (the upstreams refused llmq's key or model name: check endpoints.*)"
        else:
            code = ErrorCode.NO_HEALTHY_ENDPOINT
        return NoChoice(code, reason, retry_at, on_completion)

    def explain(self, model: str, *, work: Work, now: float) -> list[Candidate]:
        """Every endpoint of ``model``, its fallbacks and its overflow models, with
        cost or skip reason (what ``pick`` may consider, whether or not it got that far)."""
        chain = self.catalog.chain(model) or ()
        models = tuple(dict.fromkeys((*chain, *self.catalog.overflow(model))))
        rows = list(self._candidates(models, work, now, frozenset(), last_resort=False))
        if all(row.skip is not None and not Skip(row.skip).full for row in rows):
            # Everything down: pick routes over ejected endpoints (panic) as a last resort.
            rows = list(self._candidates(models, work, now, frozenset(), last_resort=True))
        return rows

    def _candidates(
        self,
        chain: Iterable[str],
        work: Work,
        now: float,
        exclude: frozenset[str],
        last_resort: bool,
    ) -> Iterable[Candidate]:
        need = self.workload.reserve(work)
        for model in chain:
            tokens = self.workload.tokens(model, work)
            cold = self.workload.cold_s(model, now, tokens, self._serving[model])
            panic = self._panic(model, now, exclude, last_resort)
            for state, _ in self._serving[model]:
                skip = (
                    Skip.EXCLUDED
                    if state.name in exclude
                    else state.blocked(model, now, need, panic=panic, batch=work.batch)
                )
                cost = state.score(now, tokens, cold)
                yield Candidate(
                    state.name, model, state.predicted_s, cost, None if skip is None else skip.value
                )

    # --- attempts ------------------------------------------------------------------

    def _state(self, endpoint: str) -> EndpointState:
        state = self._states.get(endpoint)
        if state is None:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        return state

    def begin(self, endpoint: str, *, work: Work, now: float, model: str | None = None) -> Attempt:
        """An attempt starts: in-flight += 1, rpm/tpm reserved, half-open probe marked.

        Pass ``model`` (``Choice.model``) so that a 401/403/404 marks only that
        model unusable; without it, an endpoint serving several models is
        marked unusable for all of them.
        """
        state = self._state(endpoint)
        if model is None and len(state.spec.models) == 1:
            model = next(iter(state.spec.models))
        tokens = self.workload.tokens(model, work)
        reserve = self.workload.reserve(work)
        self._next_id += 1
        probe = state.begin(self._next_id, now, tokens, reserve, batch=work.batch)
        return Attempt(self._next_id, endpoint, model, work, now, tokens, reserve, probe)

    def succeed(self, attempt: Attempt, *, now: float, output_tokens: int | None) -> None:
        """The attempt answered: a latency sample, health restored."""
        state = self._state(attempt.endpoint)
        first = state.latency.samples == 0
        by_input = attempt.work.by_input
        tokens = attempt.tokens if output_tokens is None or by_input else float(output_tokens)
        used = attempt.work.prompt_tokens + (0.0 if by_input else tokens)
        done = state.succeed(
            attempt.id,
            now,
            started=attempt.started,
            tokens=tokens,
            unused_tokens=attempt.reserved - used if output_tokens is not None else 0.0,
            probe=attempt.probe,
        )
        if not done:
            return
        if first:
            self.workload.forget_cold()
        if output_tokens is not None and attempt.model is not None and not by_input:
            self.workload.observe(attempt.model, tokens)

    def fail(
        self,
        attempt: Attempt,
        kind: FailureKind,
        *,
        now: float,
        retry_after_s: float | None = None,
        rand: Callable[[], float] | None = None,
    ) -> None:
        """The attempt failed; what that does depends on ``kind`` (see FailureKind)."""
        self._state(attempt.endpoint).fail(
            attempt.id,
            kind,
            now,
            started=attempt.started,
            model=attempt.model,
            probe=attempt.probe,
            jitter=(rand or self._rand)(),
            retry_after_s=retry_after_s,
            reserved=attempt.reserved,
        )

    def cancel(self, attempt: Attempt, *, now: float) -> None:
        """The attempt was abandoned (hedge loser, shutdown): no sample either way."""
        self._state(attempt.endpoint).cancel(attempt.id, now, probe=attempt.probe)

    # --- timing --------------------------------------------------------------------

    def attempt_timeout(self, endpoint: str, *, work: Work, remaining_s: float) -> float:
        """How long one attempt may take (see :func:`timeouts.attempt_timeout`)."""
        state = self._state(endpoint)
        cap = work.prompt_tokens if work.by_input else work.output_tokens
        if work.stream:
            cap = 0
        return timeouts.attempt_timeout(
            state.latency,
            self.config,
            cap_tokens=cap if cap is not None else self.config.default_max_tokens,
            bound_s=state.spec.timeout_s,
            remaining_s=remaining_s,
        )

    def hedge_delay(self, endpoint: str, *, work: Work, model: str | None = None) -> float | None:
        """The endpoint's p95 latency for this job; None until enough samples."""
        state = self._state(endpoint)
        if model is None and len(state.spec.models) == 1:
            model = next(iter(state.spec.models))
        tokens = 0.0 if work.stream else self.workload.tokens(model, work)
        return timeouts.hedge_delay(state.latency, self.config, tokens=tokens)

    # --- status --------------------------------------------------------------------

    def snapshot(self, *, now: float) -> list[EndpointStatus]:
        """Health of every endpoint, as data."""
        return [state.status(now) for state in self._states.values()]

    def share(self, index: int, count: int, *, now: float) -> None:
        """This worker is ``index`` of ``count`` live workers: hold that share of every
        endpoint's limits (``max_concurrency``, ``rpm``, ``tpm``), so that they hold
        for the fleet (``EndpointState.share``). ``count`` 1: the whole limits."""
        if not 0 <= index < max(count, 1):
            raise ValueError(f"share {index} of {count}")
        for state in self._states.values():
            state.share(index, count, now)

    def window_use(self, *, now: float) -> dict[str, tuple[float | None, float | None]]:
        """Per endpoint, what this worker's rpm and tpm windows hold (for the state message)."""
        return {name: state.window_use(now) for name, state in self._states.items()}

    def leave_room(
        self,
        count: int,
        peers: Mapping[int, Mapping[str, tuple[float | None, float | None]]],
    ) -> None:
        """Cap this worker's windows at what the peers leave. ``peers``: each live
        peer's rank → its reported window use per endpoint (a peer that reported
        nothing counts at its full share)."""
        for name, state in self._states.items():
            spec = state.spec
            if not peers:
                state.leave(None, None)
                continue
            rpm = tpm = 0.0
            for rank, use in peers.items():
                used_rpm, used_tpm = use.get(name, (None, None))
                if spec.rpm is not None:
                    rpm += max(split(spec.rpm, rank, count), used_rpm or 0.0)
                if spec.tpm is not None:
                    tpm += max(split(spec.tpm, rank, count), used_tpm or 0.0)
            state.leave(rpm, tpm)

    def observe_remote(self, endpoint: str, *, ejected_for_s: float, now: float) -> None:
        """Another worker ejected ``endpoint``: hold it open as long (gossip hook).

        Does not count toward this worker's ejection streak; unknown names are ignored.
        """
        state = self._states.get(endpoint)
        if state is not None and ejected_for_s > 0:
            state.circuit.hold(now + ejected_for_s)
