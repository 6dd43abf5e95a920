"""The ``llmq`` command. Subcommands import their modules lazily so that
``llmq --help`` and small commands start fast."""

from __future__ import annotations

import asyncio

import click

from schemas.settings import ConfigError, Settings, load_settings
from workers.frame_reader import SafeConnection

__all__ = ["main"]


class _LazyGroup(click.Group):
    """Resolve subcommands from ``module:attribute`` only when they are used."""

    def __init__(self, *args: object, lazy: dict[str, str], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module, attr = self._lazy[cmd_name].split(":")
            try:
                command: click.Command = getattr(__import__(module, fromlist=[attr]), attr)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise  # a real missing dependency, not a command still to come
                return None
            return command
        return super().get_command(ctx, cmd_name)


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(
    cls=_LazyGroup,
    lazy={
        "worker": "workers.command:worker_command",
        "fleet": "workers.fleet.command:fleet_command",
        "demo": "producers.demo:demo_command",
        "gateway": "producers.gateway:gateway_command",
        "submit": "producers.submit:submit_command",
        "dlq": "producers.dlq:dlq_group",
        "status": "producers.status:status_command",
        "probe": "producers.probe:probe_command",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
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
    from producers.topology import TopologyError, apply_topology
    from schemas.topology import plan

    settings = _settings(config)

    async def run() -> None:
        import aio_pika

        connection = await aio_pika.connect(
            settings.broker.url.get_secret_value(), connection_class=SafeConnection
        )
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
