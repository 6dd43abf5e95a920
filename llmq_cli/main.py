"""The ``llmq`` command: the roles' commands and the operator tools, imported
directly (mypy sees every one; a missing module fails loudly, never hides a
command)."""

from __future__ import annotations

import asyncio

import click

from llmq_cli.demo import demo_command
from llmq_cli.prices import prices_command
from llmq_cli.probe import probe_command
from llmq_cli.status import status_command
from producers.deadletters.command import dlq_group
from producers.gateway import gateway_command
from producers.submit_command import submit_command
from schemas.broker.connection import open_connection
from schemas.settings import ConfigError, Settings, load_settings
from workers.command import worker_command
from workers.fleet.command import fleet_command

__all__ = ["main"]


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmq-router")
def main() -> None:
    """llmq: a RabbitMQ-native router for LLM chat-completion jobs."""


@main.group()
def topology() -> None:
    """Declare or show the exchanges and queues llmq uses."""


@topology.command("apply")
@click.option("--config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
def topology_apply(config: str | None) -> None:
    """Declare exchanges, quorum queues and bindings (idempotent)."""
    from schemas.broker.topology import TopologyError, apply_topology
    from schemas.topology import plan

    settings = _settings(config)

    async def run() -> None:

        connection = await open_connection(settings.broker.addresses, name="llmq-topology")
        try:
            applied = await apply_topology(connection, plan(settings.topology))
        finally:
            await connection.close()
        click.echo(
            f"topology applied: {applied.exchanges} exchanges, {applied.queues} queues,"
            f" {applied.bindings} bindings"
        )

    try:
        asyncio.run(run())
    except TopologyError as exc:
        raise click.ClickException(str(exc)) from None
    except (ConnectionError, OSError) as exc:
        raise click.ClickException(f"cannot reach the broker: {exc}") from None


@topology.command("show")
@click.option("--config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
def topology_show(config: str | None) -> None:
    """Print what ``apply`` declares."""
    from schemas.topology import plan

    topo = plan(_settings(config).topology)
    for ex in topo.exchanges:
        click.echo(f"exchange {ex.name} ({ex.type}, durable)")
    for q in topo.queues:
        args = ", ".join(f"{k}={v}" for k, v in q.arguments.items())
        click.echo(f"queue    {q.name} ({args})")
    for b in topo.bindings:
        click.echo(f"binding  {b.exchange} --[{b.routing_key or '*'}]--> {b.queue}")


for _command in (
    worker_command,
    fleet_command,
    demo_command,
    gateway_command,
    submit_command,
    dlq_group,
    status_command,
    probe_command,
    prices_command,
):
    main.add_command(_command)
