"""Every file under deploy/ parses, and none holds a real-looking secret; the
same for the testing kit's files, which ship as package data (the demo's
config, the fleet's scenarios)."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KIT = [ROOT / "llmq_cli" / "demo.toml", *sorted((ROOT / "workers/fleet/scenarios").glob("*"))]
# Documented fakes: the fake fleet's keys (sk-fleet-<scenario>), the gateway's demo key.
DEMO_KEY = re.compile(r"sk-fleet-[a-z]+|sk-llmq-demo")


def checked() -> list[Path]:
    return sorted([*(p for p in DEPLOY.rglob("*") if p.is_file()), *KIT])


def files(*suffixes: str) -> list[Path]:
    return [p for p in checked() if p.suffix in suffixes]


def test_there_is_something_to_check() -> None:
    assert len(files(".yaml", ".yml")) >= 12
    assert len(files(".json")) >= 2
    assert len(files(".toml")) >= 4
    assert all(p.is_file() for p in KIT) and len(KIT) >= 4


@pytest.mark.parametrize("path", files(".json"), ids=lambda p: str(p.relative_to(ROOT)))
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


@pytest.mark.parametrize("path", files(".toml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_toml_parses(path: Path) -> None:
    assert tomllib.loads(path.read_text())


@pytest.mark.parametrize("path", files(".yaml", ".yml"), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path, yaml_docs: Callable[[Path], list[Any]]) -> None:
    docs = yaml_docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_no_real_looking_secret_anywhere(render_definitions: ModuleType) -> None:
    documented = {r.dev_password for r in render_definitions.roles()}  # admin-dev, ...
    assert {"producer-dev", "gateway-dev", "worker-dev"} <= documented
    for path in (p for p in checked() if p.suffix != ".pyc"):
        text = path.read_text(errors="replace")
        for key in re.findall(r"\bsk-[A-Za-z0-9_-]{6,}", text):
            assert DEMO_KEY.fullmatch(key), f"{path.relative_to(ROOT)}: {key}"
        assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text), path
        # A URL with a password holds a documented dev password or a placeholder.
        for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", text):
            assert password in {*documented, "CHANGE_ME", "...", "…", "guest"} or (
                password.startswith("<")
            ), f"{path.relative_to(ROOT)}: {password}"
