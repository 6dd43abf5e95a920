"""The architecture, enforced (docs/development.md, "Layers").

**The routing core stays pure**: no I/O, no clock, no randomness of its own.
Every module of ``workers/routing`` is parsed (not imported) and each import
is checked: only the standard library (minus I/O, time, randomness,
concurrency and dynamic imports), ``schemas.errors`` and ``workers.routing``
itself. The checker is tested against bad sources too, so this test can fail.

**The house has layers that only point down.** :data:`LAYERS` is the table.
Every module of the four top-level packages belongs to the layer of its
longest matching prefix; a module may import modules of its own layer and of
the layers below, except that the two roles (``workers`` and ``producers``)
never import each other. Imports are read from the source, top-level and
inside functions alike (a lazy import is still an edge), and the rule is
checked on the transitive closure, so no path through a third module escapes
it. A subprocess then shows what an ``import`` really loads: the routing core
loads no pydantic and no I/O library, the contract no I/O library. The checker
is run on made-up graphs too, so this test can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
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


# ---- layers -------------------------------------------------------------

PACKAGES = ("schemas", "workers", "producers", "llmq_cli")

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("contract", ("schemas",)),
    ("broker", ("schemas.broker", "schemas.exposition", "schemas.logs", "schemas.event_loop")),
    ("roles", ("workers", "producers")),
    ("command line", ("llmq_cli",)),
)
"""Bottom first. The contract: wire models, codec, error codes, topology plan,
settings, redaction. The broker layer: connections, the one confirmed publish,
topology apply, frame guard, plus the process plumbing both roles share (logs,
the metrics/health server, the event loop). The roles. The command line."""

ROLES = frozenset({"workers", "producers"})

IO_LIBRARIES = ("aio_pika", "aiormq", "pamqp", "aiohttp", "httpx", "prometheus_client", "uvloop")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imported_names(source: str, module: str, *, is_package: bool) -> set[str]:
    """Every module name ``source`` imports, anywhere in the file."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> our modules it imports, parents included (importing ``a.b.c``
    runs ``a/__init__`` and ``a/b/__init__`` too)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        raw = imported_names(
            path.read_text(encoding="utf-8"), name, is_package=path.name == "__init__.py"
        )
        for imported in raw:
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name:
                    targets.add(prefix)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int:
    best, level = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return level


def closure(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Each module that reaches, directly or not, a higher layer or the other role."""
    found = []
    for module in sorted(graph):
        mine, role = layer_of(module), module.split(".")[0]
        for target in sorted(closure(graph, module)):
            other = target.split(".")[0]
            if layer_of(target) > mine:
                found.append(f"{module} -> {target} (up: {LAYERS[layer_of(target)][0]})")
            elif role in ROLES and other in ROLES and other != role:
                found.append(f"{module} -> {target} (role to role)")
    return found


def package_edges(graph: Mapping[str, Iterable[str]]) -> set[tuple[str, str]]:
    return {
        (module.split(".")[0], target.split(".")[0])
        for module, targets in graph.items()
        for target in targets
        if module.split(".")[0] != target.split(".")[0]
    }


def test_every_module_is_in_a_layer_and_the_scan_is_real() -> None:
    modules = our_modules()
    assert {"workers.service", "producers.gateway", "schemas.codec", "llmq_cli.main"} <= set(
        modules
    )
    for module in modules:
        layer_of(module)


def test_layers_only_point_down_and_roles_never_meet() -> None:
    assert violations(import_graph(our_modules())) == []


def test_packages_form_no_cycle() -> None:
    """Between top-level packages the edges go one way: no cycle, no role-to-role edge."""
    edges = package_edges(import_graph(our_modules()))
    assert ("workers", "producers") not in edges and ("producers", "workers") not in edges
    assert {(b, a) for a, b in edges} & edges == set()
    assert edges <= {
        ("workers", "schemas"),
        ("producers", "schemas"),
        ("llmq_cli", "schemas"),
        ("llmq_cli", "workers"),
        ("llmq_cli", "producers"),
    }


def _loaded(*modules: str) -> set[str]:
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_importing_the_routing_core_loads_no_pydantic_and_no_io() -> None:
    routing = sorted(m for m in our_modules() if m.startswith("workers.routing"))
    loaded = _loaded(*routing)
    assert "workers" in loaded  # the import really happened
    forbidden = {"pydantic", "pydantic_core", "pydantic_settings", "asyncio", *IO_LIBRARIES}
    assert loaded & forbidden == set()


def test_importing_the_contract_loads_no_io_library() -> None:
    contract = sorted(m for m in our_modules() if layer_of(m) == 0)
    loaded = _loaded(*contract)
    assert "pydantic" in loaded  # the contract's models did load
    assert loaded & set(IO_LIBRARIES) == set()


# The checker itself, on made-up graphs.


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"schemas.codec": {"workers.service"}}, ["schemas.codec -> workers.service (up: roles)"]),
        (
            {"producers.gateway": {"workers.metrics"}},
            ["producers.gateway -> workers.metrics (role to role)"],
        ),
        (
            {
                "workers.service": {"schemas.broker.topology"},
                "schemas.broker.topology": {"schemas.topology"},
            },
            [],
        ),
        (
            # Transitive: the contract reaches a role through the broker layer.
            {
                "schemas.topology": {"schemas.broker.publisher"},
                "schemas.broker.publisher": {"llmq_cli.main"},
            },
            [
                "schemas.broker.publisher -> llmq_cli.main (up: command line)",
                "schemas.topology -> llmq_cli.main (up: command line)",
                "schemas.topology -> schemas.broker.publisher (up: broker)",
            ],
        ),
        ({"llmq_cli.status": {"workers.state", "producers.client"}}, []),
    ],
)
def test_checker_finds_edges_that_point_up_or_across(
    graph: dict[str, set[str]], expected: list[str]
) -> None:
    assert violations(graph) == expected


def test_imports_are_read_from_functions_and_relative_forms() -> None:
    source = "def f():\n    from workers.service import Worker\nfrom . import sibling\n"
    names = imported_names(source, "producers.demo", is_package=False)
    assert {"workers.service", "workers.service.Worker", "producers.sibling"} <= names
