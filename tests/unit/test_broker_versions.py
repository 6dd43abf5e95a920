"""What RabbitMQ 4.x refuses, checked in llmq's source without a broker.

- ``basic.qos`` with ``global=true``: deprecated (``global_qos``), denied by
  default on 4.3, where it silently becomes per-consumer; quorum queues never
  supported it. No call may ask for it.
- A queue that is neither durable nor exclusive: 4.3 refuses it
  (``transient_nonexcl_queues``) and closes the connection.
- ``x-max-priority`` on a quorum queue (406 on 4.x), and ``x-queue-mode`` /
  ``x-queue-version`` (classic queues v1 are gone in 4.3).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(
    path
    for package in ("schemas", "workers", "producers", "llmq_cli", "bench")
    for path in (ROOT / package).rglob("*.py")
)
REFUSED_ARGUMENTS = ("x-max-priority", "x-queue-mode", "x-queue-version")


def calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append((path, node))
    return found


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def where(path: Path, call: ast.Call) -> str:
    return f"{path.relative_to(ROOT)}:{call.lineno}"


def test_no_global_qos() -> None:
    found = calls("set_qos")
    assert found, "the scan finds the consumers' set_qos calls"
    for path, call in found:
        value = keyword(call, "global_")
        assert value is None or (isinstance(value, ast.Constant) and value.value is False), (
            f"{where(path, call)}: global QoS (denied on RabbitMQ 4.3, never on quorum queues)"
        )


def test_every_declared_queue_is_durable_exclusive_or_passive() -> None:
    found = calls("declare_queue")
    assert len(found) >= 5, "the scan finds the queue declarations"
    for path, call in found:
        flags = {
            name
            for name in ("durable", "exclusive", "passive")
            if isinstance(v := keyword(call, name), ast.Constant) and v.value is True
        }
        assert flags, f"{where(path, call)}: a transient non-exclusive queue (refused on 4.3)"


@pytest.mark.parametrize("argument", REFUSED_ARGUMENTS)
def test_no_queue_argument_that_4x_refuses(argument: str) -> None:
    for path in SOURCES:
        assert argument not in path.read_text(), f"{path.relative_to(ROOT)} uses {argument}"
