"""Attempts billed but not answered (hedge losers, timeouts): each charged its estimate once."""

from __future__ import annotations

import pytest

from schemas.codec import Job
from schemas.errors import ErrorCode
from schemas.settings import Settings
from workers.attempts import Abandoned, Failed, Served
from workers.events import Event, Spent
from workers.providers import UpstreamReply
from workers.routing.spend import Hold
from workers.spend_gate import SpendGate
from workers.spend_limits import SpendLimits

# USD per token: input 0.01 on "a", 0.02 on "b"; output 1.
ENDPOINTS = [
    {
        "name": name,
        "base_url": "http://127.0.0.1:9/v1",
        "models": ["m"],
        "input_per_mtok": price,
        "output_per_mtok": 1e6,
    }
    for name, price in (("a", 1e4), ("b", 2e4))
]


def gate(events: list[Event], *, hard_cap: bool = True) -> SpendGate:
    settings = Settings(
        endpoints=ENDPOINTS,
        budgets={
            "models": {"m": {"monthly_usd": 1_000, "hard_cap": hard_cap}},
            "tenants": {"acme": {"monthly_usd": 1_000}},
        },
    )
    limits = SpendLimits(settings.budgets, origin="w#1", clock=lambda: 1_783_000_000.0)
    return SpendGate(settings, limits, default_max_tokens=10, hook=events.append)


def job() -> Job:
    return Job(
        job_id="j",
        correlation_id="j",
        reply_to=None,
        sla_class="interactive",
        model="m",
        tenant="acme",
        body={},
        output_cap=10,
        prompt_chars=400,
        published_ms=0,
        deadline_ms=1,
        body_bytes=500,
    )


def spent(g: SpendGate, key: str = "model:m") -> float:
    return g.limits.ledger.spent(key)


def test_a_hedge_loser_is_charged_its_prompt_estimate_beside_the_winners_usage() -> None:
    events: list[Event] = []
    g = gate(events)
    hold = g.before(job(), "m")
    assert isinstance(hold, Hold)
    loser = Abandoned("b", "m", prompt_tokens=100, elapsed_s=0.4)
    served = Served(UpstreamReply({}, 100, 10), "a", "m", 2, True, 5.0, (loser,))
    cost = g.after(hold, job(), served)
    g.release(hold)  # the route's finally: a no-op once charged
    assert cost == pytest.approx(11.0)  # the reply's cost_usd: the winner's usage only
    assert spent(g) == pytest.approx(11.0 + 2.0)  # + 100 tokens at b's 0.02
    assert spent(g, "tenant:acme") == pytest.approx(13.0)
    assert g.limits.ledger.reserved("model:m") == 0.0
    charged = [e for e in events if isinstance(e, Spent)]
    assert [(e.endpoint, e.prompt_tokens) for e in charged] == [("a", 100), ("b", None)]
    # The loser's is an estimate: no tokens were reported, so none are counted.
    assert [e.cost_usd for e in charged] == pytest.approx([11.0, 2.0])


def test_a_failed_job_is_charged_for_its_timed_out_attempts_and_its_hold_released() -> None:
    events: list[Event] = []
    g = gate(events)
    hold = g.before(job(), "m")
    assert isinstance(hold, Hold)
    assert g.limits.ledger.reserved("model:m") > 0
    timeouts = (Abandoned("a", "m", 100, 0.3), Abandoned("b", "m", 100, 0.3))
    failed = Failed(ErrorCode.DEADLINE_EXCEEDED, "timed out", 2, False, "b", "m", timeouts)
    assert g.failed(hold, job(), failed) == pytest.approx(1.0 + 2.0)
    g.release(hold)
    assert spent(g) == pytest.approx(3.0)
    assert g.limits.ledger.reserved("model:m") == 0.0
    assert g.limits.ledger.holds == 0


def test_nothing_abandoned_charges_nothing_more() -> None:
    g = gate([])
    hold = g.before(job(), "m")
    assert isinstance(hold, Hold)
    g.failed(hold, job(), Failed(ErrorCode.OVER_CAPACITY, "busy", 0, False, None, None))
    assert spent(g) == 0.0 and g.limits.ledger.holds == 0
    hold = g.before(job(), "m")
    assert isinstance(hold, Hold)
    g.after(hold, job(), Served(UpstreamReply({}, 100, 10), "a", "m", 1, False, 5.0))
    assert spent(g) == pytest.approx(11.0)


def test_estimates_count_without_a_hard_cap_and_unknown_pairs_cost_nothing() -> None:
    g = gate([], hard_cap=False)
    hold = g.before(job(), "m")
    assert isinstance(hold, Hold)
    odd = (Abandoned("gone", "m", 100, 0.1), Abandoned("a", "m", 50, 0.1))
    g.failed(hold, job(), Failed(ErrorCode.UPSTREAM_ERROR, "x", 2, False, "a", "m", odd))
    assert spent(g) == pytest.approx(0.5)
