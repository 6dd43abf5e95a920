"""A fake fleet of upstreams for the demo, tests and benchmarks.

Each endpoint of a scenario listens on its own loopback port and speaks its
``kind``'s wire format (OpenAI's ``/v1/chat/completions`` and ``/v1/embeddings``
by default; Azure OpenAI's deployment paths; Anthropic's ``/v1/messages``) with
seeded latency, lengths and faults (5xx, 429, hangs, malformed bodies, missing
usage, slow bodies, refused connections). docs/fleet.md describes the scenario format; the shipped
scenarios are package data (``shipped_scenarios``, ``scenario_file``).
"""

from workers.fleet.plan import Outcome, Plan, plan_request
from workers.fleet.runner import run_fleet, serve
from workers.fleet.runtime import EndpointInfo, Fleet, endpoint_rng
from workers.fleet.scenario import (
    Endpoint,
    Latency,
    Scenario,
    ScenarioError,
    TokenRange,
    Window,
    load_scenario,
    scenario_file,
    shipped_scenarios,
)
from workers.fleet.stats import EndpointStats

__all__ = [
    "Endpoint",
    "EndpointInfo",
    "EndpointStats",
    "Fleet",
    "Latency",
    "Outcome",
    "Plan",
    "Scenario",
    "ScenarioError",
    "TokenRange",
    "Window",
    "endpoint_rng",
    "load_scenario",
    "plan_request",
    "run_fleet",
    "scenario_file",
    "serve",
    "shipped_scenarios",
]
