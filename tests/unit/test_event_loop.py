"""Every command starts its loop through ``schemas.event_loop.run``: uvloop
where it is installed, asyncio's own loop where it is not (Windows, PyPy)."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import event_loop

ROOT = Path(__file__).resolve().parents[2]


async def loop_class() -> str:
    loop = type(asyncio.get_running_loop())
    return f"{loop.__module__}.{loop.__qualname__}"


def test_runs_on_uvloop_when_it_is_installed() -> None:
    pytest.importorskip("uvloop")
    assert event_loop.run(loop_class()) == "uvloop.Loop"


def test_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert event_loop.run(loop_class()).startswith("asyncio.")


def test_returns_the_result_and_raises_the_error() -> None:
    async def boom() -> None:
        raise KeyError("x")

    async def seven() -> int:
        return 7

    assert event_loop.run(seven()) == 7
    with pytest.raises(KeyError):
        event_loop.run(boom())


def test_importing_it_loads_no_uvloop() -> None:
    code = "import sys, schemas.event_loop; print('uvloop' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def uvloop_importers() -> list[str]:
    """Package modules that import uvloop anywhere (at the top or in a function)."""
    found = []
    for package in ("schemas", "producers", "workers", "llmq_cli"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                if any(n.split(".")[0] == "uvloop" for n in names):
                    found.append(path.relative_to(ROOT).as_posix())
    return sorted(set(found))


def test_only_the_helper_imports_uvloop() -> None:
    """A direct `import uvloop` in a command would fail where uvloop is not installed."""
    assert uvloop_importers() == ["schemas/event_loop.py"]
