"""``llmq fleet``: the click command that serves a scenario's fake upstreams."""

from __future__ import annotations

import click

from workers.fleet.runner import run_fleet
from workers.fleet.scenario import ScenarioError, scenario_file

__all__ = ["fleet_command"]


@click.command("fleet")
@click.option(
    "--scenario",
    "scenario",
    required=True,
    help="A shipped scenario (demo, faults, zero) or a scenario TOML file (see docs/fleet.md).",
)
@click.option("--seed", type=int, default=None, help="Overrides the scenario's seed.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
def fleet_command(scenario: str, seed: int | None, host: str) -> None:
    """Serve fake OpenAI-compatible upstreams, one port per endpoint, until Ctrl-C."""
    try:
        with scenario_file(scenario) as path:
            run_fleet(path, seed=seed, host=host)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot bind: {exc}") from None
