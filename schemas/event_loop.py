"""How llmq's commands run their main coroutine: on uvloop where it is installed.

uvloop is a dependency only where it builds (not on Windows, not on PyPy);
elsewhere the commands run on asyncio's own loop, with the same behaviour.

Why here: the worker, the fleet, the gateway and the demo all start a loop,
and ``schemas`` is the one package both roles may import. Nothing in it
imports this module, and asyncio and uvloop are imported only when
:func:`run` is called, so the contract stays free of event-loop code.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop (uvloop's when installed)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result
