"""The public names of ``schemas`` are frozen: changing them is a visible decision."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

import schemas

ROOT = Path(__file__).resolve().parents[2]

# Changing this list changes the contract's Python API: update it on purpose.
FROZEN = [
    "CONTENT_TYPE",
    "DEAD_HEADERS",
    "HEADERS",
    "HTTP_STATUS",
    "RETRIABLE",
    "SCHEMA_VERSION",
    "ChatMessage",
    "ChatRequest",
    "ConfigError",
    "Delivery",
    "ErrorCode",
    "Job",
    "Rejected",
    "Reply",
    "ReplyError",
    "Routing",
    "Settings",
    "SlaClass",
    "decode_job",
    "decode_reply",
    "encode_reply",
    "load_settings",
]


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 order: CONSTANTS, then Classes, then functions.
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_all_is_frozen() -> None:
    """``schemas.__all__`` is exactly the frozen list."""
    assert schemas.__all__ == FROZEN


def test_all_is_sorted_without_duplicates() -> None:
    """The list is sorted (constants, classes, functions) and has no duplicates."""
    assert sorted(FROZEN, key=_isort_key) == FROZEN
    assert len(set(FROZEN)) == len(FROZEN)


@pytest.mark.parametrize("name", FROZEN)
def test_every_name_importable(name: str) -> None:
    """Each exported name is importable from the package."""
    namespace: dict[str, object] = {}
    exec(f"from schemas import {name}", namespace)
    assert namespace[name] is getattr(schemas, name)


def test_no_unlisted_public_names() -> None:
    """Everything public in the package namespace (besides submodules) is in __all__."""
    for name in dir(schemas):  # the names load lazily: load every one first
        getattr(schemas, name)
    public = {
        name
        for name, value in vars(schemas).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(FROZEN)


@pytest.mark.parametrize(
    "module", ["schemas.codec", "schemas.contract", "schemas.errors", "schemas.settings"]
)
def test_submodule_all_resolves(module: str) -> None:
    """Each submodule's own __all__ names exist."""
    mod = importlib.import_module(module)
    assert [name for name in mod.__all__ if not hasattr(mod, name)] == []


def test_schemas_is_this_repository() -> None:
    """``import schemas`` loads this repo's package, not PyPI's ``schemas``."""
    assert Path(schemas.__file__).resolve().is_relative_to(ROOT)
