"""FailureStats (rate and cost of failing) and Circuit (eject, half-open, close)."""

from __future__ import annotations

import math

import pytest

from workers.routing import CircuitState, RoutingConfig
from workers.routing.health import Circuit, FailureStats

CFG = RoutingConfig()


def test_failure_rate_is_shrunk_on_little_evidence() -> None:
    """One failure out of one call is 1/(1 + 5 prior calls), not 100%."""
    stats = FailureStats(CFG)
    assert stats.rate == 0.0
    assert stats.raw_rate == 0.0
    stats.observe(10.0, failed=True, elapsed_s=2.0)
    assert stats.rate == pytest.approx(1 / 6)
    assert stats.raw_rate == 1.0


def test_failure_rate_converges_to_the_true_rate_under_traffic() -> None:
    """At 100 calls/s with 5% failures the rate reads ~5%."""
    stats = FailureStats(CFG)
    for i in range(6000):
        stats.observe(i / 100, failed=i % 20 == 0, elapsed_s=0.05)
    assert stats.rate == pytest.approx(0.05, rel=0.05)


def test_outcomes_fade_with_time() -> None:
    """After failure_tau_s of silence the old outcomes weigh exp(−1)."""
    stats = FailureStats(CFG)
    for i in range(10):
        stats.observe(float(i) / 100, failed=True, elapsed_s=1.0)
    calls = stats.calls
    stats.observe(0.09 + CFG.failure_tau_s, failed=False)
    assert stats.calls == pytest.approx(calls * math.exp(-1) + 1, rel=1e-6)
    assert stats.decay(stats.stamp) == 1.0
    assert stats.decay(stats.stamp + CFG.failure_tau_s) == pytest.approx(math.exp(-1))


def test_failure_cost_is_an_ewma_of_elapsed_time() -> None:
    """The first failure sets the cost; later ones move it by 1/failure_cost_window."""
    stats = FailureStats(CFG)
    stats.observe(1.0, failed=True, elapsed_s=30.0)
    assert stats.cost_s == 30.0
    stats.observe(2.0, failed=True, elapsed_s=0.0)
    assert stats.cost_s == pytest.approx(30.0 * (1 - 1 / CFG.failure_cost_window))
    stats.observe(3.0, failed=False)
    assert stats.cost_s == pytest.approx(24.0)


def test_reset_forgets_the_rate_but_not_the_cost() -> None:
    stats = FailureStats(CFG)
    stats.observe(1.0, failed=True, elapsed_s=3.0)
    stats.reset()
    assert (stats.rate, stats.calls, stats.cost_s) == (0.0, 0.0, 3.0)
    assert "rate=0.000" in repr(stats)


def failing(circuit: Circuit, stats: FailureStats, now: float, *, probe: bool = False,
            jitter: float = 0.5) -> bool:  # fmt: skip
    stats.observe(now, failed=True, elapsed_s=0.01)
    return circuit.on_failure(now, probe=probe, jitter=jitter, stats=stats)


def test_ejects_after_consecutive_failures() -> None:
    """Five in a row eject (Envoy consecutive_5xx); a success in between resets the count."""
    circuit, stats = Circuit(CFG), FailureStats(CFG)
    for i in range(4):
        assert not failing(circuit, stats, float(i))
    circuit.on_success(4.0, probe=False)
    for i in range(4):
        assert not failing(circuit, stats, 5.0 + i)
    assert failing(circuit, stats, 9.0)
    assert circuit.state(9.0) is CircuitState.OPEN
    assert circuit.open_until == pytest.approx(9.0 + CFG.eject_base_s)
    assert circuit.ejections == 1


def test_ejects_on_a_high_failure_rate_without_a_streak() -> None:
    """Alternating failures never make five in a row, but 50% over 20+ calls ejects."""
    circuit, stats = Circuit(CFG), FailureStats(CFG)
    ejected = False
    for i in range(40):
        if i % 2:
            stats.observe(i / 10, failed=False)
            circuit.on_success(i / 10, probe=False)
        else:
            ejected = failing(circuit, stats, i / 10)
        if ejected:
            break
    assert ejected
    assert stats.calls >= CFG.eject_min_calls


def test_ejection_time_grows_exponentially_with_jitter_and_cap() -> None:
    """30 s · 2^(k−1), ±20% from the jitter draw, capped at 300 s."""
    circuit = Circuit(CFG)
    assert circuit.eject(0.0, 0.0) == pytest.approx(30.0 * 0.8)
    assert circuit.eject(0.0, 0.5) == pytest.approx(60.0)
    assert circuit.eject(0.0, 1.0) == pytest.approx(120.0 * 1.2)
    assert circuit.eject(0.0, 0.5) == pytest.approx(240.0)
    assert circuit.eject(0.0, 0.5) == pytest.approx(300.0)
    for _ in range(100):  # no overflow however long the streak
        duration = circuit.eject(0.0, 0.999)
    assert duration == pytest.approx(300.0 * 1.1996)


def test_half_open_admits_one_probe_and_success_closes() -> None:
    circuit, stats = Circuit(CFG), FailureStats(CFG)
    circuit.eject(0.0, 0.5)
    assert not circuit.on_begin(10.0)  # still open: not a probe (panic traffic)
    assert circuit.state(30.0) is CircuitState.HALF_OPEN
    assert circuit.on_begin(30.0)
    assert not circuit.on_begin(30.0)  # one probe at a time
    assert circuit.on_success(31.0, probe=True)
    assert circuit.state(31.0) is CircuitState.CLOSED
    assert not circuit.probing
    assert "ejections=1" in repr(circuit)
    _ = stats


def test_probe_failure_ejects_again_for_longer() -> None:
    circuit, stats = Circuit(CFG), FailureStats(CFG)
    circuit.eject(0.0, 0.5)
    assert circuit.on_begin(30.0)
    assert failing(circuit, stats, 31.0, probe=True)
    assert circuit.open_until == pytest.approx(31.0 + 60.0)
    assert "until=" in repr(circuit)


def test_stale_results_while_open_do_not_change_the_circuit() -> None:
    """Attempts begun before the ejection finishing during it: neither closes nor re-ejects."""
    circuit, stats = Circuit(CFG), FailureStats(CFG)
    circuit.eject(0.0, 0.5)
    assert not failing(circuit, stats, 5.0)
    assert not circuit.on_success(6.0, probe=False)
    assert circuit.open_until == pytest.approx(30.0)
    # Once the ejection time is over any success is evidence enough.
    assert circuit.on_success(30.5, probe=False)


def test_cancelled_probe_frees_the_slot() -> None:
    circuit = Circuit(CFG)
    circuit.eject(0.0, 0.5)
    assert circuit.on_begin(30.0)
    circuit.on_cancel(False)
    assert circuit.probing
    circuit.on_cancel(True)
    assert not circuit.probing


def test_streak_decays_while_healthy() -> None:
    """After eject_max_s closed per step, the next ejection is shorter again."""
    circuit = Circuit(CFG)
    circuit.eject(0.0, 0.5)
    circuit.eject(0.0, 0.5)
    circuit.on_success(100.0, probe=True)
    assert circuit.eject(100.0 + CFG.eject_max_s, 0.5) == pytest.approx(60.0)  # 2 → 1 → 2
    circuit.on_success(500.0, probe=True)
    assert circuit.eject(500.0 + 10 * CFG.eject_max_s, 0.5) == pytest.approx(30.0)


def test_hold_keeps_the_circuit_open_at_least_until() -> None:
    circuit = Circuit(CFG)
    circuit.hold(50.0)
    assert circuit.state(49.0) is CircuitState.OPEN
    circuit.hold(20.0)
    assert circuit.open_until == 50.0
