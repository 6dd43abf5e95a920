"""``llmq fleet``: the click command that serves a scenario's fake upstreams."""

from __future__ import annotations

from pathlib import Path

import click

from workers.fleet.runner import run_fleet
from workers.fleet.scenario import ScenarioError

__all__ = ["fleet_command"]


@click.command("fleet")
@click.option(
    "--scenario",
    "scenario",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Scenario TOML (see docs/fleet.md), e.g. deploy/demo/scenarios/demo.toml.",
)
@click.option("--seed", type=int, default=None, help="Overrides the scenario's seed.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
def fleet_command(scenario: Path, seed: int | None, host: str) -> None:
    """Serve fake OpenAI-compatible upstreams, one port per endpoint, until Ctrl-C."""
    try:
        run_fleet(scenario, seed=seed, host=host)
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot bind: {exc}") from None
