"""Events, hooks, metrics, state messages, budgets, tracing, status and probe, without I/O."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmq_cli.probe import Sample, percentile
from llmq_cli.probe import summarize as probe_summary
from llmq_cli.status import Observed, QueueInfo, summarize
from producers.gateway_metrics import GatewayMetrics
from schemas.errors import ErrorCode
from schemas.exposition import new_registry
from schemas.settings import BudgetsSettings, ConfigError, Settings, load_settings
from workers.events import (
    RETRY_BUDGET_EXHAUSTED,
    AttemptDone,
    Event,
    Hedged,
    Hooks,
    JobDone,
    ObservedRetryBudget,
    Retried,
    SpendAlert,
    Spent,
)
from workers.job_log import LogHook
from workers.metrics import WorkerMetrics, configured_tenants
from workers.routing import EndpointSpec, FailureKind, Router, RoutingConfig, Work
from workers.scrape import Sources, register_state
from workers.spend_limits import SpendLimits, month_of
from workers.state import STATE_VERSION, StateBook, decode_state
from workers.tracing import NOOP_TRACER, make_tracer

ROOT = Path(__file__).resolve().parents[2]
WORK = Work(prompt_tokens=10, output_tokens=10)


def job(code: ErrorCode | None, **kw: Any) -> JobDone:
    fields: dict[str, Any] = {
        "job_id": "j1",
        "sla_class": "interactive",
        "code": code,
        "dead_lettered": code is not None,
        "model": "m1",
        "endpoint": "a",
        "tenant": "acme",
        "attempts": 2,
        "queue_s": 0.01,
        "total_s": 0.2,
    }
    return JobDone(**{**fields, **kw})


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


# --- events and logs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "level"),
    [
        (None, logging.DEBUG),
        (ErrorCode.INVALID_REQUEST, logging.INFO),
        (ErrorCode.OVER_BUDGET, logging.INFO),
        (ErrorCode.UPSTREAM_ERROR, logging.WARNING),
        (ErrorCode.INTERNAL_ERROR, logging.WARNING),
    ],
)
def test_job_log_level_follows_the_outcome(
    code: ErrorCode | None, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Ok jobs log at debug; caller errors at info; fleet errors at warning; with fields."""
    logger = logging.getLogger("test.jobs")
    caplog.set_level(logging.DEBUG, logger="test.jobs")
    LogHook(logger)(job(code))
    [record] = caplog.records
    assert record.levelno == level
    fields = {k: getattr(record, k) for k in ("job_id", "model", "endpoint", "attempts", "code")}
    assert fields == {
        "job_id": "j1",
        "model": "m1",
        "endpoint": "a",
        "attempts": 2,
        "code": None if code is None else code.value,
    }


def test_ok_jobs_cost_nothing_when_debug_is_off(caplog: pytest.LogCaptureFixture) -> None:
    """At info level an ok job writes no line; other events are ignored by the log hook."""
    logger = logging.getLogger("test.quiet")
    caplog.set_level(logging.INFO, logger="test.quiet")
    hook = LogHook(logger)
    for event in (job(None), AttemptDone("a", "m1", "ok", 0.1), RETRY_BUDGET_EXHAUSTED):
        hook(event)
    assert caplog.records == []


def test_budget_alert_is_a_warning_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    """A budget alert names the budget, threshold and spend."""
    logger = logging.getLogger("test.budget")
    caplog.set_level(logging.INFO, logger="test.budget")
    LogHook(logger)(SpendAlert("tenant", "acme", 0.75, 76.5, 100.0, "2026-07"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "75%" in record.getMessage()
    assert (record.scope, record.budget, record.threshold) == ("tenant", "acme", 0.75)  # type: ignore[attr-defined]


def test_hooks_fan_out_and_the_budget_reports_refusals() -> None:
    """Hooks calls each hook in order; ObservedRetryBudget reports each refusal."""
    first, second = Recorder(), Recorder()
    hooks = Hooks([first, second])
    budget = ObservedRetryBudget(ratio=0.0, min_per_s=0.0)
    budget.hook = hooks
    assert budget.try_spend(0.0) is False
    generous = ObservedRetryBudget(ratio=1.0, min_per_s=10.0)
    generous.hook = hooks
    assert generous.try_spend(0.0) is True
    assert first.events == second.events == [RETRY_BUDGET_EXHAUSTED]


# --- metrics ----------------------------------------------------------------------------


def scrape(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_worker_metrics_count_events_and_cap_tenants() -> None:
    """Each event lands in its series; tenants past the cap are (other)."""
    registry = new_registry()
    metrics = WorkerMetrics(registry, max_tenants=2)
    for tenant in ("t1", "t2", "t3", "t1", None):
        metrics(Spent("m1", "a", tenant, 10, 20, 0.5))
    for event in (
        job(None),
        job(ErrorCode.UPSTREAM_ERROR),
        job(None, duplicate=True),
        job(None, queue_s=None, total_s=None),
        AttemptDone("a", "m1", "ok", 0.3),
        AttemptDone("a", "m1", "timeout", 2.0),
        Retried("b", "timeout"),
        Hedged("b"),
        RETRY_BUDGET_EXHAUSTED,
        SpendAlert("model", "m1", 0.5, 50, 100, "2026-07"),
        Spent("m1", "a", "t1", None, None, None),
    ):
        metrics(event)
    got = scrape(registry)

    def v(metric: str, /, **labels: str) -> float:
        return got.get((metric, frozenset(labels.items())), 0.0)

    assert v("llmq_tokens_total", model="m1", endpoint="a", tenant="t1", kind="prompt") == 20
    assert (
        v("llmq_tokens_total", model="m1", endpoint="a", tenant="(other)", kind="completion") == 20
    )
    assert v("llmq_cost_usd_total", model="m1", endpoint="a", tenant="(none)") == 0.5
    assert v("llmq_jobs_total", outcome="ok", code="none") == 2  # not the duplicate
    assert v("llmq_jobs_total", outcome="error", code="upstream_error") == 1
    assert v("llmq_dead_letters_total", code="upstream_error") == 1
    assert v("llmq_queue_wait_seconds_count", sla_class="interactive") == 2
    assert v("llmq_job_duration_seconds_count", sla_class="interactive") == 2
    assert v("llmq_upstream_duration_seconds_count", endpoint="a", outcome="timeout") == 1
    assert v("llmq_retries_total", endpoint="b", after="timeout") == 1
    assert v("llmq_hedges_total", endpoint="b") == 1
    assert v("llmq_retry_budget_exhausted_total") == 1
    assert v("llmq_budget_alerts_total", scope="model", name="m1", threshold="0.5") == 1


def test_configured_tenants_keep_their_label_whatever_comes_first() -> None:
    """Junk tenants take the first-come slots only; configured ones always have a label."""
    settings = load_settings(
        None,
        budgets={"tenants": {"acme": {"monthly_usd": 10}}},
        gateway={"tenants": {"globex": "GLOBEX_KEYS"}},
        tenancy={"users": {"svc-billing": "billing"}, "default": "shared"},
    )
    configured = configured_tenants(settings)
    assert configured == {"acme", "globex", "billing", "shared"}
    metrics = WorkerMetrics(new_registry(), max_tenants=6, configured_tenants=configured)
    junk = [metrics.tenant_label(f"junk-{i}") for i in range(50)]
    assert junk[:2] == ["junk-0", "junk-1"] and set(junk[2:]) == {"(other)"}
    for tenant in ("acme", "globex", "billing", "shared"):
        assert metrics.tenant_label(tenant) == tenant
    assert metrics.tenant_label("junk-1") == "junk-1" and metrics.tenant_label(None) == "(none)"
    # More configured tenants than slots: each still has its own label, no one else does.
    crowded = WorkerMetrics(new_registry(), max_tenants=2, configured_tenants=configured)
    assert crowded.tenant_label("late") == "(other)" and crowded.tenant_label("shared") == "shared"


def test_state_collector_reads_live_state() -> None:
    """Endpoint gauges come from the router snapshot at scrape time."""
    router = Router([EndpointSpec("a", {"m1": "m1"}, 8)], config=RoutingConfig(eject_after=1))
    attempt = router.begin("a", work=WORK, now=0.0)
    router.fail(attempt, FailureKind.SERVER_ERROR, now=0.1)
    registry = new_registry()
    register_state(
        registry,
        Sources(
            endpoints=lambda: router.snapshot(now=0.2),
            counters=lambda: {"in_flight": 3, "requeued": 1, "duplicates": 2, "reconnects": 0},
            retry_balance=lambda: 7.5,
            spend_limits=lambda: [
                {"scope": "model", "name": "m1", "spent_usd": 1.5, "limit_usd": 9}
            ],
            peers=lambda: 2,
            loop_lag=lambda: 0.001,
        ),
    )
    got = scrape(registry)
    assert (
        got[("llmq_endpoint_circuit_state", frozenset({("endpoint", "a"), ("state", "open")}))] == 1
    )
    assert got[("llmq_endpoint_ejections_total", frozenset({("endpoint", "a")}))] == 1
    assert got[("llmq_jobs_in_flight", frozenset())] == 3
    assert got[("llmq_retry_budget_balance", frozenset())] == 7.5
    assert got[("llmq_budget_spent_usd", frozenset({("scope", "model"), ("name", "m1")}))] == 1.5
    assert got[("llmq_state_peers", frozenset())] == 2


def test_gateway_metrics() -> None:
    """Requests by route and status, with a histogram per route."""
    metrics = GatewayMetrics(new_registry())
    metrics.observe("/v1/chat/completions", 200, 0.5)
    metrics.observe("/v1/chat/completions", 200, 0.7)
    got = scrape(metrics.registry)
    key = frozenset({("route", "/v1/chat/completions"), ("status", "200")})
    assert got[("llmq_gateway_requests_total", key)] == 2


# --- state messages ----------------------------------------------------------------------


def test_state_message_shares_errors_and_own_ejections_only() -> None:
    """Shares and failure kinds over the window; only this worker's own ejection is announced."""
    router = Router(
        [EndpointSpec("a", {"m1": "m1"}, 8), EndpointSpec("b", {"m1": "m1"}, 8)],
        config=RoutingConfig(eject_after=1, eject_jitter=0.0, eject_base_s=30.0),
    )
    book = StateBook(origin="w#1", worker="w")
    for i in range(3):
        attempt = router.begin("a", work=WORK, now=float(i))
        router.succeed(attempt, now=i + 0.1, output_tokens=10)
    attempt = router.begin("b", work=WORK, now=5.0)
    router.fail(attempt, FailureKind.SERVER_ERROR, now=5.1)
    book(AttemptDone("b", "m1", "server_error", 0.1))
    book(AttemptDone("a", "m1", "cancelled", 0.1))
    state = book.build(
        statuses=router.snapshot(now=6.0),
        status={"ok": 3, "in_flight": 0},
        now=6.0,
        interval_s=1.0,
        spend=None,
    )
    a, b = state["endpoints"]
    assert (a["share"], b["share"], a["recent_attempts"]) == (0.75, 0.25, 3)
    assert b["errors"] == {"server_error": 1} and a["errors"] == {}
    assert b["state"] == "open" and b["ejected_for_s"] == pytest.approx(29.1)
    assert a["ejected_for_s"] is None
    assert state["v"] == STATE_VERSION and state["ok"] == 3
    # A peer's hold is not re-announced (no echo), and the window moves on.
    router.observe_remote("a", ejected_for_s=10, now=7.0)
    later = book.build(
        statuses=router.snapshot(now=7.0), status={}, now=7.0, interval_s=1.0, spend=None
    )
    assert later["endpoints"][0]["state"] == "open"
    assert later["endpoints"][0]["ejected_for_s"] is None
    assert later["endpoints"][1]["ejected_for_s"] == pytest.approx(28.1)


def test_remote_ejections_are_read_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """Announced ejections come back as (endpoint, seconds); junk is skipped."""
    caplog.set_level(logging.INFO, logger="llmq.worker")
    book = StateBook(origin="me", worker="me")
    state = {
        "worker": "peer",
        "endpoints": [
            {"name": "a", "ejected_for_s": 30},
            {"name": "b", "ejected_for_s": None},
            {"name": "c", "ejected_for_s": -1},
            "junk",
            {"ejected_for_s": 5},
        ],
    }
    assert book.remote_ejections(state, now=100.0) == [("a", 30.0)]
    assert book.remote_ejections(state, now=101.0) == [("a", 30.0)]
    assert len([r for r in caplog.records if "ejected by worker peer" in r.getMessage()]) == 1
    assert book.remote_ejections({"endpoints": "junk"}, now=0) == []


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (b'{"v": 1, "origin": "w#1"}', True),
        (b'{"v": 2, "origin": "w#1"}', False),
        (b'{"v": 1}', False),
        (b"[1]", False),
        (b"not json", False),
    ],
)
def test_decode_state(body: bytes, ok: bool) -> None:
    """Only version-1 state messages with an origin are read."""
    assert (decode_state(body) is not None) == ok


# --- budgets -----------------------------------------------------------------------------


def test_budget_keeper_checks_records_and_rolls_over() -> None:
    """The hard cap message, alerts as events, and a new month from the clock."""
    now = [1_782_864_000.0]  # 2026-07-01 UTC
    events = Recorder()
    keeper = SpendLimits(
        BudgetsSettings(models={"m1": {"monthly_usd": 10, "hard_cap": True}}),
        origin="w#1",
        hook=events,
        clock=lambda: now[0],
    )
    assert month_of(now[0]) == "2026-07"
    keeper.spend("m1", None, 6.0)
    keeper.spend("m1", None, None)
    assert keeper.check("m1", None) is None
    keeper.spend("m1", "acme", 4.0)
    assert keeper.check("m1", None) == "the monthly budget of model 'm1' (10.00 USD) is spent"
    assert [e.threshold for e in events.events if isinstance(e, SpendAlert)] == [0.5, 0.75, 0.9]
    assert keeper.view() == [
        {"scope": "model", "name": "m1", "limit_usd": 10, "hard_cap": True, "spent_usd": 10.0}
    ]
    now[0] += 31 * 86400
    assert keeper.check("m1", None) is None
    assert keeper.payload() == {"month": "2026-08", "origins": {"w#1": {}}, "alerted": {}}
    keeper.heard({"month": "2026-08", "origins": {"x": {"model:m1": 12.0}}})
    assert keeper.check("m1", None) is not None


def test_no_budgets_cost_nothing() -> None:
    """Without budgets nothing is checked, recorded or gossiped."""
    keeper = SpendLimits(BudgetsSettings(), origin="w")
    assert not keeper.enabled
    assert keeper.check("m1", "t") is None
    keeper.spend("m1", "t", 1.0)
    keeper.heard({"month": "x"})
    assert keeper.payload() is None and keeper.view() == []


def test_budget_settings_are_validated() -> None:
    """Budgets name served models; thresholds are fractions, sorted."""
    with pytest.raises(ConfigError, match=r"budgets\.models\.nope: no endpoint serves"):
        load_settings(
            None,
            endpoints=[{"name": "e", "base_url": "http://x/v1", "models": ["m1"]}],
            budgets={"models": {"nope": {"monthly_usd": 1}}},
        )
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_settings(None, budgets={"thresholds": [0.5, 1.5]})
    settings: Any = load_settings(None, budgets={"thresholds": [0.9, 0.5, 0.9]})
    assert settings.budgets.thresholds == (0.5, 0.9)


# --- tracing -----------------------------------------------------------------------------


def test_tracing_is_a_no_op_without_an_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTLP endpoint: no spans."""
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert make_tracer() is NOOP_TRACER and not NOOP_TRACER.enabled
    NOOP_TRACER.shutdown()


def test_tracing_is_a_no_op_without_the_packages(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exporter configured but OpenTelemetry not installed: no spans, one info line."""
    pytest.importorskip("aiohttp")  # always there; the point is the next line
    try:
        import opentelemetry  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("opentelemetry is installed here")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    caplog.set_level(logging.INFO, logger="llmq.worker")
    assert make_tracer() is NOOP_TRACER
    assert any("opentelemetry" in r.getMessage() for r in caplog.records)


# --- status and probe --------------------------------------------------------------------


def worker_state(name: str, states: dict[str, str], *, sent_at: float, **kw: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "origin": f"{name}#1",
        "worker": name,
        "sent_at": sent_at,
        "interval_s": 1.0,
        "in_flight": 1,
        "ok": 5,
        "errors": 1,
        "endpoints": [
            {
                "name": ep,
                "state": st,
                "in_flight": 1,
                "predicted_s": 0.5,
                "recent_attempts": 3 if ep == "a" else 1,
                "errors": {"timeout": 1},
            }
            for ep, st in states.items()
        ],
        **kw,
    }


def test_status_summary_merges_workers() -> None:
    """Worst state wins, in-flight and errors add up, share is of the fleet, stale workers drop."""
    settings = load_settings(None, budgets={"tenants": {"acme": {"monthly_usd": 100}}})
    spend = {"month": "2026-07", "origins": {"w1#1": {"tenant:acme": 30.0}}, "alerted": {}}
    observed = Observed(
        queues=[QueueInfo("q.interactive", "interactive", ready=4), QueueInfo("dead", "dead", 7)],
        states={
            "w1#1": worker_state("w1", {"a": "closed", "b": "open"}, sent_at=99.0, spend=spend),
            "w2#1": worker_state("w2", {"a": "half_open", "b": "closed"}, sent_at=99.5),
            "old#1": worker_state("old", {"a": "closed"}, sent_at=10.0),
        },
        received_at={"w1#1": 99.0, "w2#1": 99.5, "old#1": 10.0},
    )
    doc = summarize(observed, settings, now=100.0)
    assert [w["worker"] for w in doc["workers"]] == ["w1", "w2"]
    a, b = doc["endpoints"]
    assert (a["state"], b["state"]) == ("half_open", "open")
    assert a["by_worker"] == {"w1": "closed", "w2": "half_open"}
    assert (a["in_flight"], a["errors"], a["share"]) == (2, {"timeout": 2}, 0.75)
    assert doc["dead_letters"] == 7 and doc["queues"][0]["ready"] == 4
    assert doc["budgets"][0]["spent_usd"] == 30.0 and doc["budgets"][0]["fraction"] == 0.3
    empty = summarize(Observed(queues=[]), Settings(), now=0.0)
    assert empty["endpoints"] == [] and empty["dead_letters"] is None


def test_percentiles_and_probe_summary() -> None:
    """Linear-interpolated percentiles; error rate and tokens/s from the samples."""
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    samples = [Sample(0.1, 10), Sample(0.3, 30), Sample(0.05, failure="timeout")]
    row = probe_summary("a", "m1", samples, wall_s=0.4)
    assert (row["ok"], row["errors"], row["error_rate"]) == (2, 1, 0.3333)
    assert row["failures"] == {"timeout": 1}
    assert row["p50_ms"] == 200.0 and row["tokens_per_s"] == 100.0
    assert probe_summary("a", "m1", [], wall_s=0.0)["tokens_per_s"] is None


# --- docs follow the code ------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    registry = new_registry()
    WorkerMetrics(registry)
    register_state(
        registry,
        Sources(
            endpoints=list,
            counters=lambda: {"in_flight": 0, "requeued": 0, "duplicates": 0, "reconnects": 0},
            retry_balance=lambda: 0.0,
            spend_limits=list,
            peers=lambda: 0,
            loop_lag=lambda: 0.0,
        ),
    )
    gateway = GatewayMetrics(new_registry())
    text = generate_latest(registry).decode() + generate_latest(gateway.registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        suffix = {"counter": "_total"}.get(family.type, "")
        names.add(family.name + suffix)
    return names


def test_observability_doc_lists_every_metric() -> None:
    """docs/observability.md names every series the code exports, and no other."""
    doc = (ROOT / "docs" / "observability.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(llmq_[a-z_]+)` \|", doc, re.M))
    assert documented == exported_metric_names()


def test_configuration_doc_names_the_new_fields() -> None:
    """docs/configuration.md documents [metrics], [budgets] and the state settings."""
    from schemas.settings import BudgetSettings, BudgetsSettings, MetricsSettings

    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for model in (MetricsSettings, BudgetsSettings, BudgetSettings):
        for name in model.model_fields:
            assert f"`{name}`" in doc, f"{model.__name__}.{name}"
    for name in ("state_exchange", "state_interval_s", "[metrics]", "[budgets]"):
        assert name in doc
