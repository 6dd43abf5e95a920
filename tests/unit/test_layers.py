"""The house has layers that only point down (docs/development.md, "Layers").

:data:`LAYERS` is the table. Every module of the four top-level packages
belongs to the layer of its longest matching prefix; a module may import
modules of its own layer and of the layers below, except that the two roles
(``workers`` and ``producers``) never import each other. Imports are read
from the source, top-level and inside functions alike (a lazy import is
still an edge), and the rule is checked on the transitive closure, so no
path through a third module escapes it. A subprocess then shows what an
``import`` really loads: the routing core loads no pydantic and no I/O
library, the contract no I/O library. The checker is run on made-up graphs
too, so this test can fail.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
