"""Run a fleet in the foreground until SIGINT or SIGTERM (``llmq fleet``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import TextIO

from schemas import event_loop
from workers.fleet.runtime import Fleet
from workers.fleet.scenario import Scenario, load_scenario

__all__ = ["run_fleet", "serve"]


async def serve(
    scenario: Scenario,
    seed: int | None = None,
    host: str = "127.0.0.1",
    out: TextIO | None = None,
) -> None:
    """Serve ``scenario`` until SIGINT/SIGTERM, announcing each endpoint on ``out``.

    One line per endpoint, whitespace-separated so scripts can read it:
    ``NAME URL MODEL[,MODEL...]``, then ``fleet ready seed=N``.
    """
    out = out if out is not None else sys.stdout
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Fleet(scenario, seed=seed, host=host) as fleet:
            width = max(len(name) for name in fleet.endpoints)
            for info in fleet.endpoints.values():
                print(f"{info.name:<{width}}  {info.url}  {','.join(info.models)}", file=out)
            print(f"fleet ready seed={fleet.seed} pid={os.getpid()}", file=out, flush=True)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_fleet(
    path: str | os.PathLike[str], seed: int | None = None, host: str = "127.0.0.1"
) -> None:
    """Load the scenario at ``path`` and serve it (on uvloop if installed) until a signal.

    Raises :class:`~workers.fleet.scenario.ScenarioError` before binding
    anything when the file is invalid.
    """
    scenario = load_scenario(path)
    event_loop.run(serve(scenario, seed=seed, host=host))
