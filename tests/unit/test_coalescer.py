"""The chunk coalescer: when a stream's chunks go to the broker, with injected time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.coalescer import Batch, CoalescePolicy, Coalescer, FlushReason

POLICY = CoalescePolicy(max_delay_s=0.010, max_tokens=4, max_chunks=6, max_bytes=100)


def test_the_first_chunk_goes_at_once() -> None:
    c: Coalescer[str] = Coalescer(POLICY)
    assert c.add("a", 0.0) == Batch(("a",), FlushReason.FIRST_TOKEN)
    assert c.deadline is None
    assert c.add("b", 0.001) is None
    assert c.deadline == pytest.approx(0.011)


def test_a_chunk_without_a_token_waits_for_the_first_token() -> None:
    """OpenAI's role chunk rides with the first token: one message, not two."""
    c: Coalescer[str] = Coalescer(POLICY)
    assert c.add("role", 0.0, tokens=0) is None
    assert c.add("tok", 0.002) == Batch(("role", "tok"), FlushReason.FIRST_TOKEN)


def test_a_lone_role_chunk_goes_when_it_is_due() -> None:
    """A model that thinks before its first token: the role chunk waits max_delay_s."""
    c: Coalescer[str] = Coalescer(POLICY)
    c.add("role", 1.0, tokens=0)
    assert c.deadline == pytest.approx(1.010)
    assert c.due(1.009) is None
    assert c.due(1.010) == Batch(("role",), FlushReason.AGE)
    assert c.due(5.0) is None and c.deadline is None
    assert c.add("tok", 5.0) == Batch(("tok",), FlushReason.FIRST_TOKEN)  # still first


def test_batches_fill_by_tokens_chunks_or_bytes() -> None:
    c: Coalescer[int] = Coalescer(POLICY)
    c.add(0, 0.0)
    got = [c.add(i, 0.001) for i in range(1, 5)]
    assert got == [None, None, None, Batch((1, 2, 3, 4), FlushReason.FULL)]  # 4 tokens
    got = [c.add(i, 0.002, tokens=0) for i in range(5, 11)]
    assert got[-1] == Batch((5, 6, 7, 8, 9, 10), FlushReason.FULL) and not any(got[:-1])
    assert c.add(11, 0.003, size=60) is None
    assert c.add(12, 0.003, size=40) == Batch((11, 12), FlushReason.FULL)  # 100 bytes


def test_a_late_timer_flushes_on_the_next_chunk() -> None:
    """The chunk that finds the batch overdue goes with it."""
    c: Coalescer[str] = Coalescer(POLICY)
    c.add("a", 0.0)
    assert c.add("b", 0.001) is None
    assert c.add("c", 0.020) == Batch(("b", "c"), FlushReason.AGE)


def test_finish_hands_back_the_rest_and_closes() -> None:
    c: Coalescer[str] = Coalescer(POLICY)
    c.add("a", 0.0)
    c.add("b", 0.001)
    assert c.finish() == Batch(("b",), FlushReason.FINISH)
    with pytest.raises(RuntimeError, match="finished"):
        c.add("late", 0.002)
    assert Coalescer[str](POLICY).finish() == Batch((), FlushReason.FINISH)


def test_no_delay_means_no_batching() -> None:
    c: Coalescer[int] = Coalescer(CoalescePolicy(max_delay_s=0.0))
    assert [c.add(i, 0.0) for i in range(3)] == [
        Batch((0,), FlushReason.FIRST_TOKEN),
        Batch((1,), FlushReason.AGE),
        Batch((2,), FlushReason.AGE),
    ]


@pytest.mark.parametrize(
    "bad",
    [{"max_delay_s": -0.1}, {"max_tokens": 0}, {"max_chunks": 0}, {"max_bytes": 0}],
)
def test_policy_bounds(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        CoalescePolicy(**bad)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.floats(0, 0.03), st.integers(0, 3), st.integers(0, 50)), max_size=60
    ),
    delay=st.sampled_from([0.0, 0.005, 0.02]),
)
def test_a_shell_that_obeys_the_deadline(
    arrivals: list[tuple[float, int, int]], delay: float
) -> None:
    """Driven like the worker will drive it (timer at each deadline): every chunk goes,
    in order, none waits longer than max_delay_s, the first token waits not at all,
    and no batch exceeds a bound except by the chunk that filled it."""
    policy = CoalescePolicy(max_delay_s=delay, max_tokens=5, max_chunks=8, max_bytes=120)
    c: Coalescer[int] = Coalescer(policy)
    sent: list[tuple[float, Batch[int]]] = []
    now, arrived = 0.0, {}
    for i, (gap, tokens, size) in enumerate(arrivals):
        deadline = c.deadline
        if deadline is not None and deadline <= now + gap:
            batch = c.due(deadline)
            assert batch is not None
            sent.append((deadline, batch))
        now += gap
        arrived[i] = (now, tokens, size)
        batch = c.add(i, now, tokens=tokens, size=size)
        if batch is not None:
            sent.append((now, batch))
    sent.append((now, c.finish()))
    assert [i for _, b in sent for i in b.chunks] == list(range(len(arrivals)))
    first_token = next((i for i, a in arrived.items() if a[1] > 0), None)
    for at, batch in sent:
        assert all(at - arrived[i][0] <= delay + 1e-9 for i in batch.chunks)
        if first_token in batch.chunks:
            assert batch.reason is FlushReason.FIRST_TOKEN and at == arrived[first_token][0]
        head = batch.chunks[:-1]
        assert sum(arrived[i][1] for i in head) < policy.max_tokens
        assert sum(arrived[i][2] for i in head) < policy.max_bytes
        assert len(head) < policy.max_chunks
