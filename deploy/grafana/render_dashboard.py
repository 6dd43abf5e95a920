"""Write deploy/grafana/dashboards/llmq.json, the Grafana dashboard of deploy/compose.yaml.

The panels are data below; the layout (rows of three 8x8 panels) is computed.
Run it from the repository root after changing a panel:

    .venv/bin/python deploy/grafana/render_dashboard.py           # rewrite the file
    .venv/bin/python deploy/grafana/render_dashboard.py --check   # exit 1 if stale

Series names must be ones the code exports (tests/deploy/test_dashboard_metrics.py
scrapes a worker and a gateway) or RabbitMQ 3.10 exports
(tests/deploy/test_broker_boot.py scrapes a booted broker). docs/operations.md
explains each panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "llmq.json"
DATASOURCE = {"type": "prometheus", "uid": "llmq-prometheus"}
RATE = "[$__rate_interval]"
WIDTH, HEIGHT, GRID = 8, 8, 24


def rate(series: str, by: str | None = None, scale: str = "") -> str:
    """``sum by (by) (rate(series[$__rate_interval]))``, optionally scaled."""
    group = f" by ({by}) " if by else ""
    return f"sum{group}(rate({series}{RATE})){scale}"


def quantile(q: float, histogram: str, by: str = "", where: str = "") -> str:
    labels = ", ".join(x for x in ("le", by) if x)
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket{where}{RATE})))"


@dataclass
class Panel:
    title: str
    description: str
    targets: list[tuple[str, str]]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    kind: str = "timeseries"
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


ROWS = [
    Row(
        "Jobs",
        [
            Panel(
                "Jobs settled / s by outcome",
                "Jobs the workers settled per second: ok, or error (an error reply was sent;"
                " most also leave a dead letter).",
                [(rate("llmq_jobs_total", "outcome"), "{{outcome}}")],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Errors / s by code",
                "Error replies by error code (docs/protocol.md). deadline_exceeded and"
                " upstream_* point at capacity or upstream trouble; invalid_request,"
                " unknown_model and payload_too_large at producers.",
                [(rate('llmq_jobs_total{outcome="error"}', "code"), "{{code}}")],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Dead letters / s",
                "Dead letters published by workers (by error code) and by the broker itself"
                " (delivery limit reached: poison jobs, crash loops, consumer timeouts).",
                [
                    (rate("llmq_dead_letters_total", "code"), "worker: {{code}}"),
                    (
                        rate("rabbitmq_global_messages_dead_lettered_delivery_limit_total"),
                        "broker: delivery limit",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "Queue wait p50 / p99 by SLA class",
                "Time from publish until a worker took the job. Rising p99 with a growing"
                " queue depth means too few workers (or too little prefetch).",
                [
                    (quantile(0.5, "llmq_queue_wait_seconds", "sla_class"), "p50 {{sla_class}}"),
                    (quantile(0.99, "llmq_queue_wait_seconds", "sla_class"), "p99 {{sla_class}}"),
                ],
                unit="s",
            ),
            Panel(
                "Job duration p50 / p99 by SLA class",
                "Publish to reply, queue wait included: what a caller experiences.",
                [
                    (quantile(0.5, "llmq_job_duration_seconds", "sla_class"), "p50 {{sla_class}}"),
                    (
                        quantile(0.99, "llmq_job_duration_seconds", "sla_class"),
                        "p99 {{sla_class}}",
                    ),
                ],
                unit="s",
            ),
            Panel(
                "Jobs in flight per worker",
                "Jobs each worker holds (at most worker.concurrency per work queue). Flat at"
                " the limit = the worker is saturated.",
                [("llmq_jobs_in_flight", "{{instance}}")],
            ),
        ],
    ),
    Row(
        "Endpoints",
        [
            Panel(
                "Upstream latency p95 (ok calls)",
                "Successful upstream calls, 95th percentile per endpoint.",
                [
                    (
                        quantile(
                            0.95, "llmq_upstream_duration_seconds", "endpoint", '{outcome="ok"}'
                        ),
                        "{{endpoint}}",
                    )
                ],
                unit="s",
            ),
            Panel(
                "Share of upstream calls",
                "Where the router sends traffic: each endpoint's share of all upstream calls"
                " (retries and hedges included).",
                [
                    (
                        rate("llmq_upstream_duration_seconds_count", "endpoint")
                        + " / ignoring(endpoint) group_left "
                        + rate("llmq_upstream_duration_seconds_count"),
                        "{{endpoint}}",
                    )
                ],
                unit="percentunit",
                stack=True,
            ),
            Panel(
                "Upstream calls / s by outcome",
                "ok, a failure kind (timeout, server_error, rate_limited, connect, ...) or"
                " cancelled (a hedge lost, a deadline passed).",
                [
                    (
                        rate(
                            'llmq_upstream_duration_seconds_count{outcome!="ok"}',
                            "endpoint, outcome",
                        ),
                        "{{endpoint}} {{outcome}}",
                    )
                ],
                unit="reqps",
            ),
            Panel(
                "Cost score per endpoint",
                "The router's predicted latency of a job at each endpoint, failures included"
                " (lower wins, before load). The worst worker's view.",
                [("max by (endpoint) (llmq_endpoint_cost_score_seconds)", "{{endpoint}}")],
                unit="s",
            ),
            Panel(
                "In flight vs capacity",
                "Requests in flight per endpoint, summed over workers, against the concurrency"
                " limit (lowered after 429s).",
                [
                    ("sum by (endpoint) (llmq_endpoint_in_flight)", "{{endpoint}} in flight"),
                    ("sum by (endpoint) (llmq_endpoint_capacity)", "{{endpoint}} capacity"),
                ],
            ),
            Panel(
                "Circuits not closed",
                "Workers whose circuit for the endpoint is in cooldown, half_open, open or"
                " unusable. Workers share health over the state exchange, so all should agree"
                " within about a second.",
                [
                    (
                        'sum by (endpoint, state) (llmq_endpoint_circuit_state{state!="closed"})',
                        "{{endpoint}} {{state}}",
                    )
                ],
                stack=True,
            ),
            Panel(
                "Failure rate per endpoint",
                "Recent (time-decayed) failure rate each worker sees; the highest.",
                [("max by (endpoint) (llmq_endpoint_failure_rate)", "{{endpoint}}")],
                unit="percentunit",
            ),
            Panel(
                "Ejections / s",
                "Outlier ejections: an endpoint taken out of rotation for a while.",
                [(rate("llmq_endpoint_ejections_total", "endpoint"), "{{endpoint}}")],
                unit="reqps",
            ),
            Panel(
                "Retries, hedges, budget refusals / s",
                "Retries (by the failure that caused them), hedge requests, and retries or"
                " hedges the retry budget refused. Refusals mean the fleet is failing faster"
                " than the budget allows retrying.",
                [
                    (rate("llmq_retries_total", "after"), "retry after {{after}}"),
                    (rate("llmq_hedges_total"), "hedges"),
                    (rate("llmq_retry_budget_exhausted_total"), "budget refused"),
                ],
                unit="reqps",
            ),
        ],
    ),
    Row(
        "Cost and budgets",
        [
            Panel(
                "Spend USD / hour by model",
                "At the configured prices and the usage each upstream returned.",
                [(rate("llmq_cost_usd_total", "model", " * 3600"), "{{model}}")],
                unit="currencyUSD",
                stack=True,
            ),
            Panel(
                "Tokens / s",
                "Prompt and completion tokens the upstreams reported.",
                [(rate("llmq_tokens_total", "kind"), "{{kind}}")],
                stack=True,
            ),
            Panel(
                "Monthly budget used",
                "Spend this month over each budget (models and tenants), as the workers share"
                " it over the broker. Alerts fire at the configured thresholds.",
                [
                    (
                        "max by (scope, name) (llmq_budget_spent_usd)"
                        " / max by (scope, name) (llmq_budget_limit_usd)",
                        "{{scope}} {{name}}",
                    )
                ],
                unit="percentunit",
                kind="bargauge",
                extra={
                    "min": 0,
                    "max": 1,
                    "thresholds": {
                        "mode": "absolute",
                        "steps": [
                            {"color": "green", "value": None},
                            {"color": "orange", "value": 0.75},
                            {"color": "red", "value": 0.9},
                        ],
                    },
                },
            ),
            Panel(
                "Spend by tenant, last 24 h",
                "The ten tenants that cost most today.",
                [
                    (
                        "topk(10, sum by (tenant) (increase(llmq_cost_usd_total[24h])))",
                        "{{tenant}}",
                    )
                ],
                unit="currencyUSD",
                kind="bargauge",
            ),
            Panel(
                "Budget alerts",
                "Alerts fired (once per threshold and month).",
                [
                    (
                        "sum by (scope, name, threshold) (increase(llmq_budget_alerts_total[1h]))",
                        "{{scope}} {{name}} {{threshold}}",
                    )
                ],
            ),
            Panel(
                "Retry budget balance",
                "Retries the budget allows right now, the lowest worker.",
                [("min(llmq_retry_budget_balance)", "balance")],
            ),
        ],
    ),
    Row(
        "Workers and gateway",
        [
            Panel(
                "Requeued, duplicates, reconnects",
                "Deliveries given back (shutdowns, broker trouble), redeliveries answered"
                " without calling upstream again, and broker reconnections.",
                [
                    (rate("llmq_jobs_requeued_total"), "requeued"),
                    (rate("llmq_jobs_duplicate_total"), "duplicates"),
                    (rate("llmq_broker_reconnects_total"), "reconnects"),
                ],
                unit="reqps",
            ),
            Panel(
                "Event loop lag",
                "How late each worker's event loop runs a timer. Above ~0.1 s the worker is"
                " CPU-bound: lower worker.concurrency or add workers.",
                [("max by (instance) (llmq_event_loop_lag_seconds)", "{{instance}}")],
                unit="s",
            ),
            Panel(
                "Workers sharing state",
                "Peers each worker hears on the state exchange: should be (workers - 1)"
                " everywhere.",
                [("llmq_state_peers", "{{instance}}")],
            ),
            Panel(
                "Gateway requests / s by status",
                "HTTP answers of the gateway by status code (429/503: backpressure; 504:"
                " deadline).",
                [(rate("llmq_gateway_requests_total", "status"), "{{status}}")],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Gateway latency p50 / p99",
                "Time to answer /v1/chat/completions.",
                [
                    (
                        quantile(
                            q,
                            "llmq_gateway_request_duration_seconds",
                            where='{route="/v1/chat/completions"}',
                        ),
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ],
                unit="s",
            ),
            Panel(
                "Gateway requests in flight",
                "Open HTTP requests.",
                [("sum(llmq_gateway_in_flight)", "in flight")],
            ),
        ],
    ),
    Row(
        "RabbitMQ",
        [
            Panel(
                "Queue depth",
                "Ready (waiting) and unacked (held by workers) messages per llmq queue. KEDA"
                " scales the workers on ready + unacked of the work queues.",
                [
                    (
                        'sum by (queue) (rabbitmq_detailed_queue_messages_ready{vhost="llmq"})',
                        "{{queue}} ready",
                    ),
                    (
                        'sum by (queue) (rabbitmq_detailed_queue_messages_unacked{vhost="llmq"})',
                        "{{queue}} unacked",
                    ),
                ],
            ),
            Panel(
                "Consumers per queue",
                "Consumers on each queue: one per worker per work queue. Zero on a work queue"
                " = nobody serves that class.",
                [
                    (
                        'sum by (queue) (rabbitmq_detailed_queue_consumers{vhost="llmq"})',
                        "{{queue}}",
                    )
                ],
            ),
            Panel(
                "Dead letters waiting",
                "Messages in llmq.dead: inspect and replay them with `llmq dlq`"
                " (docs/dead-letters.md).",
                [
                    (
                        'sum(rabbitmq_detailed_queue_messages{vhost="llmq", queue="llmq.dead"})',
                        "llmq.dead",
                    )
                ],
                kind="stat",
            ),
            Panel(
                "Broker dead-lettering / s by reason",
                "Messages the broker dead-lettered: delivery_limit (poison or crash loops),"
                " rejected (requeue=false), maxlen, expired.",
                [
                    (rate(f"rabbitmq_global_messages_dead_lettered_{reason}_total"), reason)
                    for reason in ("delivery_limit", "rejected", "maxlen", "expired")
                ],
                unit="reqps",
            ),
            Panel(
                "Redeliveries and unroutable / s",
                "Redeliveries (crashes, reconnects, shutdowns) and messages that matched no queue.",
                [
                    (rate("rabbitmq_global_messages_redelivered_total"), "redelivered"),
                    (
                        rate("rabbitmq_global_messages_unroutable_returned_total"),
                        "unroutable returned",
                    ),
                    (
                        rate("rabbitmq_global_messages_unroutable_dropped_total"),
                        "unroutable dropped",
                    ),
                ],
                unit="reqps",
            ),
            Panel(
                "Resource alarms",
                "1 while the memory or disk alarm is on: every publishing connection"
                " (producers, the gateway, the workers' replies) waits until it clears.",
                [
                    ("max(rabbitmq_alarms_memory_used_watermark)", "memory"),
                    ("max(rabbitmq_alarms_free_disk_space_watermark)", "disk"),
                ],
                kind="stat",
            ),
        ],
    ),
]


def _panel(p: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": p.unit}
    if p.stack:
        defaults["custom"] = {"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 30}
    defaults.update(p.extra)
    options: dict[str, Any] = {}
    if p.kind == "timeseries":
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "id": panel_id,
        "datasource": DATASOURCE,
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": chr(65 + i)}
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def render() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "type": "row",
                "title": row.title,
                "id": len(panels) + 1,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        per_line = GRID // WIDTH
        for i, p in enumerate(row.panels):
            x = (i % per_line) * WIDTH
            panels.append(_panel(p, len(panels) + 1, x, y + (i // per_line) * HEIGHT))
        y += -(-len(row.panels) // per_line) * HEIGHT
    return {
        "uid": "llmq",
        "title": "llmq",
        "description": "llmq workers, endpoints, cost and the broker."
        " Panel by panel: docs/operations.md.",
        "tags": ["llmq", "rabbitmq"],
        "timezone": "",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = dumps(render())
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
