"""The Grafana dashboard (deploy/grafana/dashboards/llmq.json) queries only series the
code really exports: a worker and a gateway run, serve a job, and are scraped.

(The rabbitmq_* series are checked against a booted broker in test_broker_boot.py.)
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from harness import FLEET_KEY, chat, running_fleet

from producers.client import LlmqClient
from producers.gateway import metrics_port, start_gateway
from schemas.settings import Settings, TopologySettings, load_settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "llmq.json"
LLMQ_METRIC = re.compile(r"\bllmq_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "gauge": ("",),
    "unknown": ("",),
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def queried(dashboard: dict[str, Any], pattern: re.Pattern[str]) -> set[str]:
    return {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in pattern.findall(target["expr"])
    }


def families(text: str) -> dict[str, str]:
    """Metric family name → type, from a scrape (families without samples included)."""
    parser = pytest.importorskip("prometheus_client.parser")
    return {f.name: f.type for f in parser.text_string_to_metric_families(text)}


def series_names(text: str) -> set[str]:
    """Every series name a scrape can have, samples or not yet (a labelled metric
    with no children shows only its HELP and TYPE lines)."""
    return {name + suffix for name, kind in families(text).items() for suffix in SUFFIXES[kind]}


def test_the_file_is_what_the_renderer_writes(render_dashboard: ModuleType) -> None:
    """Edit panels in deploy/grafana/render_dashboard.py, then run it."""
    assert DASHBOARD.read_text() == render_dashboard.dumps(render_dashboard.render())


def test_the_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "llmq" and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
    # Panels cover what issue 7 asks operators to see.
    names = queried(dashboard, LLMQ_METRIC)
    for wanted in (
        "llmq_jobs_total",
        "llmq_queue_wait_seconds_bucket",
        "llmq_upstream_duration_seconds_bucket",
        "llmq_endpoint_cost_score_seconds",
        "llmq_endpoint_in_flight",
        "llmq_endpoint_circuit_state",
        "llmq_retries_total",
        "llmq_hedges_total",
        "llmq_retry_budget_exhausted_total",
        "llmq_tokens_total",
        "llmq_cost_usd_total",
        "llmq_budget_spent_usd",
    ):
        assert wanted in names, wanted


async def test_every_llmq_series_on_the_dashboard_is_exported(
    dashboard: dict[str, Any], amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMQ_TEST_FLEET_KEY", FLEET_KEY)
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)
    p = f"d{uuid.uuid4().hex[:8]}"
    topology: dict[str, Any] = {
        "jobs_exchange": f"{p}.jobs",
        "dead_exchange": f"{p}.dlx",
        "dead_queue": f"{p}.dead",
        "queue_prefix": f"{p}.q.",
    }
    if "state_exchange" in TopologySettings.model_fields:
        topology["state_exchange"] = f"{p}.state"

    def settings(base_url: str) -> Settings:
        return load_settings(
            None,
            broker={"url": amqp_url},
            topology=topology,
            endpoints=[
                {
                    "name": "up",
                    "base_url": base_url,
                    "api_key_env": "LLMQ_TEST_FLEET_KEY",
                    "models": ["m1"],
                    "input_per_mtok": 1.0,
                    "output_per_mtok": 2.0,
                }
            ],
            metrics={"host": "127.0.0.1", "port": 0},
            gateway={"require_auth": False, "metrics_port": 0},
            budgets={"models": {"m1": {"monthly_usd": 100.0}}},
        )

    scrapes: dict[str, str] = {}
    async with running_fleet({"name": "up", "models": ["m1"]}) as fleet:
        config = settings(fleet.url("up"))
        worker = Worker(config, name="dashboard-test")
        await worker.start()
        runner, gateway_port = await start_gateway(config, host="127.0.0.1", port=0)
        try:
            async with LlmqClient(amqp_url, exchange=config.topology.jobs_exchange) as client:
                reply = await client.call(chat("m1"), timeout_s=20, tenant="t1")
            assert reply["status"] == "ok", reply
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{gateway_port}/v1/models") as answer:
                    assert answer.status == 200
                scrape_ports = (("worker", worker.metrics_port), ("gateway", metrics_port(runner)))
                for where, port in scrape_ports:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as answer:
                        assert answer.status == 200
                        scrapes[where] = await answer.text()
        finally:
            await runner.cleanup()
            await worker.stop(grace_s=5)

    exported = series_names(scrapes["worker"]) | series_names(scrapes["gateway"])
    used = queried(dashboard, LLMQ_METRIC)
    assert len(used) >= 20
    missing = sorted(used - exported)
    assert missing == [], f"the dashboard queries series nobody exports: {missing}"
    # And every family the worker and gateway export is on some panel.
    exported_families = families(scrapes["worker"]) | families(scrapes["gateway"])
    unshown = sorted(
        name
        for name, kind in exported_families.items()
        if name.startswith("llmq_") and not {name + s for s in SUFFIXES[kind]} & used
    )
    assert unshown == [], f"on no panel (add one in render_dashboard.py): {unshown}"


def test_names_are_read_with_their_type_suffixes() -> None:
    text = (
        "# HELP llmq_x_total X.\n# TYPE llmq_x_total counter\n"
        "# HELP llmq_h H.\n# TYPE llmq_h histogram\n"
        "# HELP llmq_g G.\n# TYPE llmq_g gauge\nllmq_g 1.0\n"
    )
    assert series_names(text) == {
        "llmq_x_total",
        "llmq_h_bucket",
        "llmq_h_sum",
        "llmq_h_count",
        "llmq_g",
    }
