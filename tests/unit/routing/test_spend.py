"""Monthly spend: a G-counter per budget, alerts once per threshold, hard caps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.routing.pricing import estimate_usd, prompt_tokens_bound
from workers.routing.spend import NULL_HOLD, Alert, Hold, SpendLedger, SpendLimit, limit_key

M = "2026-07"
MODEL = SpendLimit("model", "gpt", 100.0, hard_cap=True)
TENANT = SpendLimit("tenant", "acme", 10.0)


def ledger(origin: str = "w1", thresholds: tuple[float, ...] = (0.5, 0.75, 0.9)) -> SpendLedger:
    return SpendLedger([MODEL, TENANT], origin=origin, thresholds=thresholds)


def test_budget_keys() -> None:
    """A budget travels under scope:name."""
    assert MODEL.key == limit_key("model", "gpt") == "model:gpt"
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
    assert book.limits == (MODEL, TENANT)


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
    capped = SpendLimit("tenant", "acme", 1.0, hard_cap=True)
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


# --- reservations: hard caps that hold under concurrency --------------------------------

CAP = SpendLimit("model", "gpt", 10.0, hard_cap=True)
SOFT = SpendLimit("tenant", "acme", 5.0)


def capped(origin: str = "w1") -> SpendLedger:
    return SpendLedger([CAP, SOFT], origin=origin)


def test_concurrent_reservations_stop_at_the_cap() -> None:
    """40 jobs in flight at once against a cap one job exhausts: exactly one is granted."""
    book = capped()
    got = [book.reserve(model="gpt", tenant="acme", estimate_usd=10.0, month=M) for _ in range(40)]
    holds = [h for h in got if isinstance(h, Hold)]
    assert len(holds) == 1 and got[1:] == [CAP] * 39
    assert book.reserved("model:gpt") == 10.0 and book.holds == 1
    book.settle(holds[0], 10.0, month=M)
    assert book.spent("model:gpt") == 10.0 <= CAP.limit_usd
    assert book.reserved("model:gpt") == 0.0 and book.holds == 0


def test_a_reservation_fits_exactly_and_frees_what_the_job_did_not_use() -> None:
    """Spend + reserved + estimate may reach the limit; settling below the estimate frees
    the rest, releasing frees all of it."""
    book = capped()
    a = book.reserve(model="gpt", tenant=None, estimate_usd=4.0, month=M)
    b = book.reserve(model="gpt", tenant=None, estimate_usd=6.0, month=M)
    assert isinstance(a, Hold) and isinstance(b, Hold)
    assert book.reserve(model="gpt", tenant=None, estimate_usd=0.01, month=M) is CAP
    book.settle(a, 1.0, month=M)  # 3 of a's 4 USD come back
    c = book.reserve(model="gpt", tenant=None, estimate_usd=3.0, month=M)
    assert isinstance(c, Hold)
    book.release(b)  # failed before any upstream work: no cost
    assert book.spent("model:gpt") == 1.0 and book.reserved("model:gpt") == 3.0
    assert "holds=1" in repr(book)


def test_a_spent_cap_refuses_even_a_free_job() -> None:
    """With the limit reached, a zero estimate (no prices configured) is refused too."""
    book = capped()
    book.record(model="gpt", tenant=None, cost_usd=10.0, month=M)
    assert book.reserve(model="gpt", tenant=None, estimate_usd=0.0, month=M) is CAP
    assert book.reserve(model="other", tenant=None, estimate_usd=0.0, month=M) != CAP


def test_uncapped_budgets_never_refuse_but_still_count() -> None:
    """A soft budget reserves nothing and refuses nothing; settling records its spend."""
    book = capped()
    hold = book.reserve(model="other", tenant="acme", estimate_usd=1e9, month=M)
    assert isinstance(hold, Hold) and hold.keys == ()
    alerts = book.settle(hold, 4.0, month=M)
    assert book.spent("tenant:acme") == 4.0
    assert [a.threshold for a in alerts] == [0.5, 0.75]


@pytest.mark.parametrize("estimate", [math.inf, math.nan])
def test_an_estimate_that_cannot_be_bounded_is_refused_by_a_cap(estimate: float) -> None:
    """inf/NaN cannot be reserved against a cap (NaN would compare as fitting)."""
    book = capped()
    assert book.reserve(model="gpt", tenant=None, estimate_usd=estimate, month=M) is CAP
    free = book.reserve(model="other", tenant=None, estimate_usd=estimate, month=M)
    assert isinstance(free, Hold) and free.amount_usd == 0.0
    negative = book.reserve(model="gpt", tenant=None, estimate_usd=-5.0, month=M)
    assert isinstance(negative, Hold) and negative.amount_usd == 0.0


def test_settle_and_release_are_idempotent() -> None:
    """A second settle or release of a hold (a caller's finally) counts nothing twice."""
    book = capped()
    hold = book.reserve(model="gpt", tenant="acme", estimate_usd=2.0, month=M)
    assert isinstance(hold, Hold)
    assert book.settle(hold, 1.0, month=M) == []
    assert book.settle(hold, 1.0, month=M) == []
    assert book.release(hold) is False
    assert book.spent("model:gpt") == 1.0 and book.spent("tenant:acme") == 1.0
    other = book.reserve(model="gpt", tenant=None, estimate_usd=2.0, month=M)
    assert isinstance(other, Hold)
    assert book.release(other) is True and book.release(other) is False
    book.settle(other, 5.0, month=M)  # released first: the cost is not recorded
    assert book.spent("model:gpt") == 1.0 and book.reserved("model:gpt") == 0.0
    book.settle(NULL_HOLD, 5.0, month=M)
    assert book.release(NULL_HOLD) is False and book.spent("model:gpt") == 1.0


def test_a_foreign_hold_changes_nothing() -> None:
    """A hold settles only in the ledger that granted it."""
    a, b = capped("a"), capped("b")
    hold = a.reserve(model="gpt", tenant=None, estimate_usd=2.0, month=M)
    assert isinstance(hold, Hold)
    assert b.settle(hold, 2.0, month=M) == [] and b.spent("model:gpt") == 0.0
    assert a.holds == 1


def test_a_fallback_model_is_charged_for_what_it_served() -> None:
    """settle(model=…) records under the model that answered, and frees the reserved one."""
    other = SpendLimit("model", "small", 100.0)
    book = SpendLedger([CAP, other], origin="w")
    hold = book.reserve(model="gpt", tenant=None, estimate_usd=5.0, month=M)
    assert isinstance(hold, Hold)
    book.settle(hold, 2.0, month=M, model="small")
    assert book.spent("model:small") == 2.0 and book.spent("model:gpt") == 0.0
    assert book.reserved("model:gpt") == 0.0


def test_a_hold_outlives_the_month_and_settles_into_the_next() -> None:
    """In flight across midnight: it still counts against the new month's cap, and its
    cost lands in the month it is settled in."""
    book = capped()
    book.record(model="gpt", tenant=None, cost_usd=3.0, month=M)
    hold = book.reserve(model="gpt", tenant=None, estimate_usd=7.0, month=M)
    assert isinstance(hold, Hold)
    assert book.reserve(model="gpt", tenant=None, estimate_usd=4.0, month="2026-08") is CAP
    assert book.spent("model:gpt") == 0.0  # August starts from zero spend
    book.settle(hold, 6.0, month="2026-08")
    assert book.spent("model:gpt") == 6.0 and book.reserved("model:gpt") == 0.0
    assert book.month == "2026-08"


def test_record_ignores_costs_that_are_not_finite() -> None:
    """inf or NaN would poison the totals and could not be gossiped."""
    book = capped()
    for cost in (math.inf, math.nan, -1.0):
        book.record(model="gpt", tenant=None, cost_usd=cost, month=M)
    assert book.spent("model:gpt") == 0.0


# A job: the ledger it runs on, its estimate, and what it really costs (≤ the estimate).
_jobs = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.floats(0, 6, allow_nan=False),
        st.floats(0, 1, allow_nan=False),
        st.sampled_from(["settle", "release", "settle twice", "release then settle"]),
        st.integers(0, 10),
    ),
    max_size=40,
)


@given(_jobs)
@settings(max_examples=300, deadline=None)
def test_reservations_never_leak_and_spend_is_what_was_settled(
    jobs: list[tuple[int, float, float, str, int]],
) -> None:
    """Any interleaving of reserve/settle/release: once every hold is gone, nothing is
    reserved, the spend is the sum of the settled costs, and one worker alone never
    passes its cap (every cost within its estimate)."""
    book = SpendLedger([CAP, SpendLimit("tenant", "t0", 8.0, hard_cap=True)], origin="w")
    live: list[tuple[Hold, float, str]] = []
    settled = {"model:gpt": 0.0, "tenant:t0": 0.0}
    for tenant_no, estimate, used, how, later in jobs:
        got = book.reserve(model="gpt", tenant=f"t{tenant_no}", estimate_usd=estimate, month=M)
        if isinstance(got, Hold):
            live.append((got, estimate * used, how))
        # Finish some job in flight (which one depends on ``later``): any order.
        if live and later % 3:
            hold, cost, how = live.pop(later % len(live))
            _finish(book, hold, cost, how, settled)
        for key in settled:
            assert book.spent(key) + book.reserved(key) <= (8.0 if key[0] == "t" else 10.0) + 1e-9
    for hold, cost, how in live:
        _finish(book, hold, cost, how, settled)
    assert book.holds == 0
    for key, total in settled.items():
        assert book.reserved(key) == 0.0
        assert book.spent(key) == pytest.approx(total)


def _finish(
    book: SpendLedger, hold: Hold, cost: float, how: str, settled: dict[str, float]
) -> None:
    if how.startswith("release"):
        book.release(hold)
        if how == "release then settle":
            book.settle(hold, cost, month=M)
        return
    book.settle(hold, cost, month=M)
    if how == "settle twice":
        book.settle(hold, cost, month=M)
        book.release(hold)
    if cost > 0:
        settled["model:gpt"] += cost
        if hold.tenant == "t0":
            settled["tenant:t0"] += cost


_fleet_steps = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "settle", "gossip"]),
        st.integers(0, 2),
        st.integers(0, 2),
        st.floats(0.5, 6, allow_nan=False),
        st.one_of(st.just(1.0), st.floats(0, 1, allow_nan=False)),  # often the worst case
    ),
    max_size=60,
)


@given(_fleet_steps)
@settings(max_examples=300, deadline=None)
def test_fleet_overshoot_stays_within_the_documented_bound(
    steps: list[tuple[str, int, int, float, float]],
) -> None:
    """Three workers gossiping at random moments: the month ends at most at
    limit + Σ over the other workers of (their reservations in flight + their spend
    the granting worker had not heard), taken at the fleet's last grant."""
    key = CAP.key
    books = [SpendLedger([CAP], origin=f"w{i}") for i in range(3)]
    own = [0.0, 0.0, 0.0]
    live: list[list[tuple[Hold, float]]] = [[], [], []]
    bound = CAP.limit_usd
    for action, i, j, estimate, used in steps:
        if action == "reserve":
            hold = books[i].reserve(model="gpt", tenant=None, estimate_usd=estimate, month=M)
            if isinstance(hold, Hold):
                live[i].append((hold, estimate * used))
                heard = books[i].payload(month=M, full=True)["origins"]
                bound = CAP.limit_usd + sum(
                    books[k].reserved(key) + own[k] - heard.get(f"w{k}", {}).get(key, 0.0)
                    for k in range(3)
                    if k != i
                )
        elif action == "settle" and live[i]:
            hold, cost = live[i].pop(j % len(live[i]))
            books[i].settle(hold, cost, month=M)
            own[i] += cost if cost > 0 else 0.0
        elif action == "gossip" and i != j:
            books[j].merge(books[i].payload(month=M, full=True), month=M)
    for i in range(3):
        for hold, cost in live[i]:
            books[i].settle(hold, cost, month=M)
            own[i] += cost if cost > 0 else 0.0
    assert sum(own) <= bound + 1e-9


# --- what a job can cost at most ----------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "cap", "n", "expected"),
    [
        (1_000_000, 0, 1, 2.0),  # the prompt alone: 1 M tokens at 2 USD/M
        (0, 1_000_000, 1, 8.0),  # one completion at the cap: 8 USD/M
        (500_000, 250_000, 4, 1.0 + 8.0),  # the prompt once, four completions at the cap
        (-10, -10, 0, 0.0),  # nonsense counts as nothing, n as one
    ],
)
def test_estimate_is_the_whole_prompt_and_n_completions_at_the_cap(
    prompt: int, cap: int, n: int, expected: float
) -> None:
    """The worst case a hard cap reserves: prompt billed once, each of n completions full."""
    assert estimate_usd(prompt, cap, 2.0, 8.0, n=n) == pytest.approx(expected)


def test_a_body_bounds_its_prompt_tokens() -> None:
    """At most one token per byte of body (byte-level BPE); never negative."""
    assert prompt_tokens_bound(4096) == 4096
    assert prompt_tokens_bound(-1) == 0
