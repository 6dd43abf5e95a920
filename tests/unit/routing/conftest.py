"""Helpers for the routing-core tests: a router on a hand-driven clock."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from schemas.settings import ModelSettings
from workers.routing import (
    Attempt,
    Choice,
    EndpointSpec,
    EndpointStatus,
    FailureKind,
    NoChoice,
    Policy,
    Router,
    RoutingConfig,
    Work,
)

WORK = Work(prompt_tokens=100, output_tokens=200)


@dataclass
class Harness:
    """A router plus a clock the test moves by hand."""

    router: Router
    now: float = 1000.0
    rand: Callable[[], float] = field(default_factory=lambda: random.Random(7).random)

    def tick(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def pick(
        self, model: str = "m", work: Work = WORK, exclude: frozenset[str] = frozenset()
    ) -> Choice | NoChoice:
        return self.router.pick(model, work=work, now=self.now, rand=self.rand, exclude=exclude)

    def choose(self, model: str = "m", work: Work = WORK) -> Choice:
        choice = self.pick(model, work)
        assert isinstance(choice, Choice), choice
        return choice

    def begin(self, endpoint: str, work: Work = WORK, model: str | None = None) -> Attempt:
        return self.router.begin(endpoint, work=work, now=self.now, model=model)

    def serve(
        self,
        endpoint: str,
        latency_s: float,
        *,
        count: int = 1,
        tokens: int = 200,
        gap_s: float = 0.05,
        model: str | None = None,
    ) -> None:
        """``count`` sequential successes taking ``latency_s`` each."""
        for _ in range(count):
            attempt = self.begin(endpoint, Work(100, tokens), model)
            self.tick(latency_s)
            self.router.succeed(attempt, now=self.now, output_tokens=tokens)
            self.tick(gap_s)

    def failing(
        self,
        endpoint: str,
        kind: FailureKind = FailureKind.SERVER_ERROR,
        *,
        count: int = 1,
        elapsed_s: float = 0.01,
        retry_after_s: float | None = None,
        model: str | None = None,
        rand: Callable[[], float] | None = None,
    ) -> None:
        for _ in range(count):
            attempt = self.begin(endpoint, model=model)
            self.tick(elapsed_s)
            self.router.fail(attempt, kind, now=self.now, retry_after_s=retry_after_s, rand=rand)

    def status(self, endpoint: str) -> EndpointStatus:
        return next(s for s in self.router.snapshot(now=self.now) if s.name == endpoint)

    def shares(self, picks: int, model: str = "m", work: Work = WORK) -> dict[str, int]:
        """Endpoint → how many of ``picks`` consecutive picks it won (nothing begun)."""
        counts: dict[str, int] = {}
        for _ in range(picks):
            choice = self.choose(model, work)
            counts[choice.endpoint] = counts.get(choice.endpoint, 0) + 1
        return counts


def spec(
    name: str,
    models: Mapping[str, str] | Sequence[str] = ("m",),
    *,
    max_concurrency: int = 64,
    rpm: int | None = None,
    tpm: int | None = None,
    timeout_s: float = 600.0,
) -> EndpointSpec:
    served = dict(models) if isinstance(models, Mapping) else {m: m for m in models}
    return EndpointSpec(name, served, max_concurrency, rpm, tpm, timeout_s)


@pytest.fixture
def make() -> Callable[..., Harness]:
    """Build a Harness: ``make(["a", "b"])`` or ``make([spec(...)], models=..., config=...)``."""

    def build(
        endpoints: Sequence[str | EndpointSpec],
        *,
        models: Mapping[str, ModelSettings] | None = None,
        config: RoutingConfig | None = None,
        policy: Policy | None = None,
        rand: Callable[[], float] | None = None,
        jitter: Callable[[], float] | None = None,
    ) -> Harness:
        specs = [spec(e) if isinstance(e, str) else e for e in endpoints]
        router = Router(specs, models or {}, config, policy, rand=jitter)
        harness = Harness(router)
        if rand is not None:
            harness.rand = rand
        return harness

    return build
