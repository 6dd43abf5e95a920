"""Random operation sequences: the router never crashes and its books balance."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from workers.routing import (
    Attempt,
    Choice,
    EndpointSpec,
    FailureKind,
    NoChoice,
    Router,
    RoutingConfig,
    Work,
)

op = st.one_of(
    st.tuples(st.just("pick"), st.integers(0, 4), st.sampled_from([None, 1, 200, 100_000])),
    st.tuples(st.just("succeed"), st.integers(0, 50), st.sampled_from([None, 0, 50, 5000])),
    st.tuples(st.just("fail"), st.integers(0, 50), st.sampled_from(list(FailureKind))),
    st.tuples(st.just("cancel"), st.integers(0, 50), st.none()),
    st.tuples(st.just("tick"), st.floats(0.0, 400.0), st.none()),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, max_size=120), seed=st.integers(0, 2**16))
def test_any_sequence_keeps_the_router_consistent(
    ops: list[tuple[str, object, object]], seed: int
) -> None:
    rng = random.Random(seed)
    router = Router(
        [
            EndpointSpec("a", {"m": "m"}, 3, rpm=30),
            EndpointSpec("b", {"m": "m", "n": "n"}, 2, tpm=5000),
            EndpointSpec("c", {"n": "n"}, 64),
        ],
        {},
        RoutingConfig(eject_after=2),
        rand=rng.random,
    )
    now = 0.0
    running: list[Attempt] = []
    for name, a, b in ops:
        if name == "tick":
            assert isinstance(a, float)
            now += a
        elif name == "pick":
            assert isinstance(a, int)
            model = ["m", "n", "x", "m", "n"][a]
            work = Work(10, b if isinstance(b, int) else None)
            choice = router.pick(model, work=work, now=now, rand=rng.random)
            if isinstance(choice, Choice):
                assert math.isfinite(choice.predicted_s) and choice.predicted_s >= 0
                running.append(
                    router.begin(choice.endpoint, work=work, now=now, model=choice.model)
                )
                timeout = router.attempt_timeout(choice.endpoint, work=work, remaining_s=30.0)
                assert 0.0 <= timeout <= 29.7 + 1e-9
            else:
                assert isinstance(choice, NoChoice)
                assert choice.retry_at is None or choice.retry_at >= now
        elif running:
            assert isinstance(a, int)
            attempt = running.pop(a % len(running))
            if name == "succeed":
                router.succeed(attempt, now=now, output_tokens=b if isinstance(b, int) else None)
            elif name == "fail":
                assert isinstance(b, FailureKind)
                router.fail(attempt, b, now=now, retry_after_s=rng.choice([None, 0.5, 900.0]))
            else:
                router.cancel(attempt, now=now)
    for status in router.snapshot(now=now):
        assert status.in_flight == sum(1 for r in running if r.endpoint == status.name)
        assert 1 <= status.capacity <= status.max_concurrency
        assert 0.0 <= status.failure_rate <= 1.0
        assert status.state in {"closed", "open", "half_open", "cooldown", "unusable"}
    for candidate in router.explain("m", work=Work(10, 100), now=now):
        assert math.isfinite(candidate.cost) and candidate.cost >= 0
