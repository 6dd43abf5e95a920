"""Monthly spend: a G-counter per budget, alerts once per threshold, hard caps."""

from __future__ import annotations

import pytest

from workers.routing.spend import Alert, Budget, SpendLedger, budget_key

M = "2026-07"
MODEL = Budget("model", "gpt", 100.0, hard_cap=True)
TENANT = Budget("tenant", "acme", 10.0)


def ledger(origin: str = "w1", thresholds: tuple[float, ...] = (0.5, 0.75, 0.9)) -> SpendLedger:
    return SpendLedger([MODEL, TENANT], origin=origin, thresholds=thresholds)


def test_budget_keys() -> None:
    """A budget travels under scope:name."""
    assert MODEL.key == budget_key("model", "gpt") == "model:gpt"
    assert TENANT.key == "tenant:acme"


def test_empty_ledger_is_false_and_records_nothing() -> None:
    """Without budgets there is nothing to track."""
    empty = SpendLedger([], origin="w")
    assert not empty and ledger()
    assert empty.record(model="gpt", tenant="acme", cost_usd=5, month=M) == []
    assert empty.payload(month=M) == {"month": M, "origins": {"w": {}}, "alerted": {}}
    assert "SpendLedger" in repr(empty)


def test_record_counts_model_and_tenant_budgets() -> None:
    """A job's cost counts toward its model's and its tenant's budgets."""
    book = ledger()
    book.record(model="gpt", tenant="acme", cost_usd=2.0, month=M)
    book.record(model="other", tenant=None, cost_usd=3.0, month=M)
    book.record(model=None, tenant="acme", cost_usd=0.0, month=M)
    assert book.spent("model:gpt") == 2.0
    assert book.spent("tenant:acme") == 2.0
    assert book.spent("model:other") == 0.0
    assert book.view() == [(MODEL, 2.0), (TENANT, 2.0)]
    assert book.budgets == (MODEL, TENANT)


def test_each_threshold_alerts_once() -> None:
    """50/75/90 % each alert once a month; a jump past two alerts both."""
    book = ledger()
    seen: list[float] = []
    for cost in (40, 10, 5, 30, 10, 10):
        alerts = book.record(model="gpt", tenant=None, cost_usd=cost, month=M)
        seen += [a.threshold for a in alerts]
    assert seen == [0.5, 0.75, 0.9]
    jump = ledger()
    alerts = jump.record(model="gpt", tenant=None, cost_usd=80, month=M)
    assert alerts == [Alert(MODEL, 0.5, 80.0, M), Alert(MODEL, 0.75, 80.0, M)]


def test_a_new_month_starts_from_zero() -> None:
    """Spend and alerts reset at the start of a month."""
    book = ledger()
    assert book.record(model="gpt", tenant=None, cost_usd=60, month=M)
    assert book.record(model="gpt", tenant=None, cost_usd=1, month="2026-08") == []
    assert book.spent("model:gpt") == 1
    assert [
        a.threshold for a in book.record(model="gpt", tenant=None, cost_usd=50, month="2026-08")
    ] == [0.5]


def test_hard_cap_blocks_once_spent() -> None:
    """A capped budget blocks at its limit; an uncapped one never does."""
    book = ledger()
    assert book.blocked(model="gpt", tenant="acme", month=M) is None
    book.record(model="gpt", tenant="acme", cost_usd=99.99, month=M)
    assert book.blocked(model="gpt", tenant="acme", month=M) is None  # tenant over, not capped
    book.record(model="gpt", tenant=None, cost_usd=0.01, month=M)
    assert book.blocked(model="gpt", tenant=None, month=M) is MODEL
    assert book.blocked(model=None, tenant=None, month=M) is None
    assert book.blocked(model="gpt", tenant=None, month="2026-08") is None


def test_tenant_hard_cap() -> None:
    """Tenant budgets can be capped too."""
    capped = Budget("tenant", "acme", 1.0, hard_cap=True)
    book = SpendLedger([capped], origin="w")
    book.record(model="gpt", tenant="acme", cost_usd=1.0, month=M)
    assert book.blocked(model="gpt", tenant="acme", month=M) is capped


def test_two_workers_see_the_sum_never_more() -> None:
    """Gossip merges by max per origin: repeated, late and relayed payloads count once."""
    a, b, c = ledger("a"), ledger("b"), ledger("c")
    a.record(model="gpt", tenant="acme", cost_usd=10, month=M)
    b.record(model="gpt", tenant=None, cost_usd=5, month=M)
    first_a = a.payload(month=M)
    for _ in range(3):
        b.merge(a.payload(month=M), month=M)
        a.merge(b.payload(month=M), month=M)
    a.record(model="gpt", tenant=None, cost_usd=1, month=M)
    b.merge(a.payload(month=M), month=M)
    b.merge(first_a, month=M)  # late, older: ignored
    assert a.spent("model:gpt") == b.spent("model:gpt") == 16
    assert b.spent("tenant:acme") == 10
    c.merge(b.payload(month=M, full=True), month=M)  # relayed: a's entry through b
    assert c.spent("model:gpt") == 16


def test_own_origin_is_never_taken_from_others() -> None:
    """A peer's copy of our own counts cannot raise them."""
    a = ledger("a")
    a.record(model="gpt", tenant=None, cost_usd=1, month=M)
    a.merge({"month": M, "origins": {"a": {"model:gpt": 50}}}, month=M)
    assert a.spent("model:gpt") == 1


def test_a_new_peer_gets_the_full_view_once() -> None:
    """Hearing an unknown origin makes the next payload carry every origin."""
    a, b, late = ledger("a"), ledger("b"), ledger("late")
    a.record(model="gpt", tenant=None, cost_usd=3, month=M)
    b.record(model="gpt", tenant=None, cost_usd=4, month=M)
    a.merge(b.payload(month=M), month=M)
    assert set(a.payload(month=M)["origins"]) == {"a", "b"}  # b was new to a
    assert set(a.payload(month=M)["origins"]) == {"a"}
    a.merge(late.payload(month=M), month=M)
    late.merge(a.payload(month=M), month=M)
    assert late.spent("model:gpt") == 7


def test_alerts_are_shared_and_not_repeated() -> None:
    """A threshold a peer already alerted does not alert again here."""
    a, b = ledger("a"), ledger("b")
    assert [x.threshold for x in a.record(model="gpt", tenant=None, cost_usd=60, month=M)] == [0.5]
    assert b.merge(a.payload(month=M), month=M) == []
    assert [x.threshold for x in b.record(model="gpt", tenant=None, cost_usd=20, month=M)] == [0.75]
    # Crossing through a merge alerts, when nobody alerted it yet.
    quiet = SpendLedger([MODEL], origin="q", thresholds=(0.5,))
    crossed = quiet.merge({"month": M, "origins": {"x": {"model:gpt": 70}}}, month=M)
    assert crossed == [Alert(MODEL, 0.5, 70.0, M)]


@pytest.mark.parametrize(
    "payload",
    [
        {"month": "2026-06", "origins": {"x": {"model:gpt": 5}}},
        {"month": M},
        {"month": M, "origins": "nope"},
        {"month": M, "origins": {"x": "nope"}},
        {"month": M, "origins": {"x": {"model:gpt": "5"}}},
        {"month": M, "alerted": {"model:gpt": "0.9"}, "origins": {}},
        {"month": M, "alerted": "nope", "origins": {"x": {"model:unknown": 0}}},
    ],
)
def test_malformed_or_foreign_payloads_change_nothing(payload: dict[str, object]) -> None:
    """Another month, or parts of the wrong shape, are skipped."""
    book = ledger()
    assert book.merge(payload, month=M) == []
    assert book.spent("model:gpt") == 0


def test_unbudgeted_keys_are_kept_for_relaying() -> None:
    """Spend under a key this worker has no budget for is kept (a peer may have one)."""
    book = ledger()
    assert book.merge({"month": M, "origins": {"x": {"model:else": 2.5}}}, month=M) == []
    assert book.spent("model:else") == 2.5
    assert book.payload(month=M, full=True)["origins"]["x"] == {"model:else": 2.5}
