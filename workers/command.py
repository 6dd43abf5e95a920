"""``llmq worker``: run one router worker until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from schemas import event_loop
from schemas.logs import setup_logging
from schemas.settings import ConfigError, Settings, load_settings
from workers.providers import adapter_for
from workers.upstream import require_transport

__all__ = ["run_worker", "worker_command"]

log = logging.getLogger("llmq.worker")


async def run_worker(settings: Settings, *, name: str | None, declare: bool) -> None:
    """Start a worker and serve until a signal; then drain and stop."""
    from workers.service import Worker

    worker = Worker(settings, name=name, declare_topology=declare)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.start()
    await stop.wait()
    log.info("signal received: draining %d in-flight jobs", worker.stats.in_flight)
    await worker.stop()


@click.command("worker")
@click.option("--config", "config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
@click.option("--name", help="Worker name in dead letters and status (default host:pid).")
@click.option(
    "--declare/--no-declare",
    default=True,
    show_default=True,
    help="Declare the topology at start (needs configure permission).",
)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
def worker_command(config: str | None, name: str | None, declare: bool, log_format: str) -> None:
    """Consume jobs and route them to the configured endpoints."""
    try:
        settings = load_settings(config)
        require_transport(settings.worker.http_transport)
        for endpoint in settings.endpoints:
            adapter_for(endpoint)  # a kind this install cannot speak: one line, not a traceback
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not settings.endpoints:
        raise click.ClickException("config error: endpoints: no endpoints configured")
    setup_logging(settings.log_level, log_format)
    event_loop.run(run_worker(settings, name=name, declare=declare))
