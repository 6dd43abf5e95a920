"""Spend snapshots: what the broker keeps, and that merging them never double counts."""

from __future__ import annotations

import orjson
import pytest

from workers.routing.spend import SpendLedger, SpendLimit
from workers.spend_store import decode_snapshot, encode_snapshot

JULY, AUGUST = "2026-07", "2026-08"
CAP = SpendLimit("model", "m1", 100.0, hard_cap=True)
ACME = SpendLimit("tenant", "acme", 1_000.0)


def ledger(origin: str) -> SpendLedger:
    return SpendLedger([CAP, ACME], origin=origin)


def stored(source: SpendLedger, month: str = JULY) -> dict[str, object]:
    """A snapshot as a starting worker reads it back from the stream."""
    spend = decode_snapshot(encode_snapshot(source.snapshot(month=month), origin=source.origin))
    assert spend is not None
    return spend


def test_a_snapshot_round_trips_and_a_marker_or_junk_is_nothing() -> None:
    a = ledger("a#1")
    a.record(model="m1", tenant="acme", cost_usd=12.5, month=JULY)
    spend = stored(a)
    assert spend == {
        "month": JULY,
        "origins": {"a#1": {"model:m1": 12.5, "tenant:acme": 12.5}},
        "alerted": {},
    }
    assert decode_snapshot(encode_snapshot(None, origin="a#1")) is None  # a start's marker
    for junk in (b"", b"[]", b"{", b'{"v": 2, "spend": {}}', b'{"v": 1, "spend": [1]}'):
        assert decode_snapshot(junk) is None


def test_a_restarted_worker_learns_the_month_from_snapshots_read_any_number_of_times() -> None:
    a = ledger("a#1")
    for _ in range(6):
        a.record(model="m1", tenant="acme", cost_usd=10.0, month=JULY)
    early = stored(a)  # a periodic snapshot
    a.record(model="m1", tenant="acme", cost_usd=10.0, month=JULY)
    final = stored(a)  # the one written at stop
    b = ledger("b#2")  # a new process: a new origin, nothing in memory
    for spend in (early, final, final, early):  # read twice, out of order
        b.merge(spend, month=JULY)
    assert b.spent("model:m1") == 70.0
    assert b.reserve(model="m1", tenant=None, estimate_usd=30.0, month=JULY) is not CAP
    assert b.reserve(model="m1", tenant=None, estimate_usd=0.5, month=JULY) is CAP


def test_overlapping_snapshots_of_several_workers_count_each_origin_once() -> None:
    a, b = ledger("a#1"), ledger("b#1")
    a.record(model="m1", tenant="acme", cost_usd=30.0, month=JULY)
    b.record(model="m1", tenant="acme", cost_usd=20.0, month=JULY)
    b.merge(a.payload(month=JULY, full=True), month=JULY)  # b heard a by gossip
    a.record(model="m1", tenant="acme", cost_usd=5.0, month=JULY)  # a spends after that
    c = ledger("c#1")
    for spend in (stored(b), stored(a), stored(b)):
        c.merge(spend, month=JULY)
    assert c.spent("model:m1") == 55.0  # 35 + 20: not 30 + 35 + 20
    assert c.spent("tenant:acme") == 55.0
    # ... and a fourth worker hearing c (which now relays a and b) still counts 55.
    d = ledger("d#1")
    d.merge(stored(c), month=JULY)
    d.merge(stored(a), month=JULY)
    assert d.spent("model:m1") == 55.0


def test_snapshots_of_another_month_are_ignored() -> None:
    a = ledger("a#1")
    a.record(model="m1", tenant="acme", cost_usd=99.0, month=JULY)
    july = stored(a)
    b = ledger("b#1")
    b.merge(july, month=AUGUST)
    assert b.spent("model:m1") == 0.0
    assert b.blocked(model="m1", tenant=None, month=AUGUST) is None
    # A worker still holding July writes August's snapshot empty: old months are dropped.
    assert stored(a, AUGUST) == {"month": AUGUST, "origins": {}, "alerted": {}}


def test_alert_marks_travel_so_a_restart_does_not_alert_again() -> None:
    a = ledger("a#1")
    assert [x.threshold for x in a.record(model="m1", tenant=None, cost_usd=80, month=JULY)] == [
        0.5,
        0.75,
    ]
    b = ledger("b#1")
    assert b.merge(stored(a), month=JULY) == []  # already alerted by a
    assert [x.threshold for x in b.record(model="m1", tenant=None, cost_usd=15, month=JULY)] == [
        0.9
    ]


def test_a_snapshot_leaves_gossip_owing_a_newcomer_its_full_payload() -> None:
    """Snapshots are taken every few intervals; they must not swallow the full payload
    gossip sends after hearing a new origin (the newcomer would wait 30 intervals)."""
    a = ledger("a#1")
    a.record(model="m1", tenant=None, cost_usd=1.0, month=JULY)
    newcomer = ledger("n#1")
    a.merge(newcomer.payload(month=JULY), month=JULY)
    a.snapshot(month=JULY)
    assert set(a.payload(month=JULY)["origins"]) == {"a#1", "n#1"}  # still full


def test_origins_that_never_spent_are_left_out() -> None:
    a = ledger("a#1")
    for i in range(50):  # idle workers heard by gossip: an origin each, no spend
        a.merge(ledger(f"idle#{i}").payload(month=JULY), month=JULY)
    a.record(model="m1", tenant=None, cost_usd=1.0, month=JULY)
    assert set(a.snapshot(month=JULY)["origins"]) == {"a#1"}


def test_a_month_of_restarts_fits_in_a_quarter_megabyte() -> None:
    """500 origins that each spent under 10 budgets: the bound docs/operations.md states."""
    budgets = [SpendLimit("model", f"gpt-4.1-mini-{i}", 1e6) for i in range(5)]
    budgets += [SpendLimit("tenant", f"tenant-{i:04d}", 1e6) for i in range(5)]
    big = SpendLedger(budgets, origin="me")
    for o in range(500):
        origin = f"llmq-worker-7d9f8b6c5-x{o:04d}:1#{o:06x}"
        counts = {b.key: 123.45678901 + o / 7 for b in budgets}
        big.merge({"month": JULY, "origins": {origin: counts}, "alerted": {}}, month=JULY)
    body = encode_snapshot(big.snapshot(month=JULY), origin="me")
    assert 150_000 < len(body) < 250_000
    assert len(orjson.loads(body)["spend"]["origins"]) == 500
    assert sum(big.spent(b.key) for b in budgets) == pytest.approx(
        sum(10 * (123.45678901 + o / 7) for o in range(500))
    )
