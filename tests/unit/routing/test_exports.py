"""The public API of workers.routing is exactly its sorted __all__."""

from __future__ import annotations

import inspect

import workers.routing as routing


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, value in vars(routing).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert routing.__all__ == sorted(routing.__all__)
    assert set(routing.__all__) == public


def test_the_workers_api_is_there() -> None:
    """The names the async worker imports (keep in step with workers/attempts.py)."""
    for name in (
        "Choice",
        "EndpointSpec",
        "FailureKind",
        "GiveUp",
        "NoChoice",
        "Progress",
        "RetryBudget",
        "Router",
        "RoutingConfig",
        "TryNow",
        "Wait",
        "Work",
        "next_step",
        "should_hedge",
        "disposition",
        "backoff",
    ):
        assert hasattr(routing, name)
