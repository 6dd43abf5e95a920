"""The routing core stays pure: no I/O, no clock, no randomness of its own.

Every module of ``workers/routing`` is parsed (not imported) and each import
is checked: only the standard library (minus I/O, time, randomness,
concurrency and dynamic imports), ``schemas.errors`` and ``workers.routing`` itself.
The checker is tested against bad sources too, so this test can fail.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUTING = ROOT / "workers" / "routing"

FORBIDDEN_STDLIB = frozenset(
    {
        "asyncio",
        "concurrent",
        "ctypes",
        "http",
        "importlib",
        "io",
        "multiprocessing",
        "os",
        "pathlib",
        "random",
        "secrets",
        "select",
        "selectors",
        "shutil",
        "signal",
        "socket",
        "ssl",
        "subprocess",
        "sys",
        "threading",
        "time",
        "urllib",
        "uuid",
    }
)
"""Standard-library modules that do I/O, read a clock or draw random numbers."""

ALLOWED_MODULES = frozenset({"schemas.errors"})
"""Of the contract, the core needs the error codes only (the models load pydantic)."""


def forbidden_imports(source: str, *, package: str = "workers.routing") -> list[str]:
    """Every import in ``source`` the routing core may not use, as readable strings."""
    problems: list[str] = []
    tree = ast.parse(source)
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for inner in ast.walk(stmt)
    }  # for the type checker only: never imported at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative imports must stay inside the package (level 1).
                if node.level > 1:
                    problems.append(f"relative import beyond {package}: level {node.level}")
                continue
            names = [node.module or ""]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"__import__", "exec", "eval"}
        ):
            problems.append(f"dynamic code: {node.func.id}()")
        for name in names:
            top = name.split(".")[0]
            if name == package or name.startswith(package + "."):
                continue
            if name in ALLOWED_MODULES:
                continue
            if top in sys.stdlib_module_names and top not in FORBIDDEN_STDLIB:
                continue
            problems.append(name)
    return problems


def routing_modules() -> list[Path]:
    return sorted(ROUTING.rglob("*.py"))


def test_routing_package_exists() -> None:
    """The scan covers real files (an empty glob would pass vacuously)."""
    names = {p.name for p in routing_modules()}
    assert {"__init__.py", "router.py", "endpoint.py"} <= names


@pytest.mark.parametrize("path", routing_modules(), ids=lambda p: p.name)
def test_routing_module_is_pure(path: Path) -> None:
    """No routing module imports I/O, clocks, randomness or third-party packages."""
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio", ["asyncio"]),
        ("import time as t", ["time"]),
        ("from random import random", ["random"]),
        ("from threading import Lock", ["threading"]),
        ("import aio_pika", ["aio_pika"]),
        ("import httpx.AsyncClient", ["httpx.AsyncClient"]),
        ("from aiohttp import ClientSession", ["aiohttp"]),
        ("import pydantic", ["pydantic"]),
        ("from workers.amqp import Publisher", ["workers.amqp"]),
        ("from schemas.broker.publisher import Publisher", ["schemas.broker.publisher"]),
        ("from schemas.settings import Settings", ["schemas.settings"]),
        ("def f():\n    import time\n", ["time"]),
        ("if True:\n    from os import environ\n", ["os"]),
        ("from .. import service", ["relative import beyond workers.routing: level 2"]),
        ("m = __import__('time')", ["dynamic code: __import__()"]),
        ("import importlib", ["importlib"]),
    ],
)
def test_checker_flags_impure_imports(source: str, expected: list[str]) -> None:
    """The checker itself catches each kind of forbidden import."""
    assert forbidden_imports(source) == expected


@pytest.mark.parametrize(
    "source",
    [
        "import math",
        "from dataclasses import dataclass",
        "from collections.abc import Callable",
        "from schemas.errors import ErrorCode",
        "from workers.routing.config import Work",
        "from . import config",
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:\n    from schemas.settings import Settings\n",
    ],
)
def test_checker_allows_pure_imports(source: str) -> None:
    """Pure standard-library modules, schemas and the package itself are fine."""
    assert forbidden_imports(source) == []
