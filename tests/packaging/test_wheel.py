"""The built wheel is what users get: it holds the four packages, their data
and the license, and installed into a fresh virtualenv with the locked runtime
dependencies only, it runs ``llmq demo`` from a directory outside the
checkout, without httpx, and says which extra the httpx transports need.

The wheel is built with ``uv build`` (hatchling) and installed with ``uv pip``
(both use uv's cache, so a second run takes seconds).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import orjson
import pytest

from schemas.settings import TopologySettings
from schemas.topology import plan

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements" / "runtime.lock"
SCENARIOS = ROOT / "workers" / "fleet" / "scenarios"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _uv() -> str:
    beside = Path(sys.executable).parent / "uv"  # scripts/install puts uv in .venv
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("uv is required to build the wheel in CI")
        pytest.skip("needs uv (scripts/install puts it in .venv)")
    return found


def run(
    *args: str | Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus anything that could point back into the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMQ_") and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = run(_uv(), "build", "--wheel", "--out-dir", out, ROOT)
    assert built.returncode == 0, built.stderr
    [path] = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the runtime lock and the wheel, nothing else."""
    where = tmp_path_factory.mktemp("venv") / "venv"
    made = run(_uv(), "venv", "--quiet", "--python", sys.executable, where)
    assert made.returncode == 0, made.stderr
    python = where / "bin" / "python"
    installed = run(
        _uv(), "pip", "install", "--quiet", "--python", python, "-r", RUNTIME_LOCK, wheel
    )
    assert installed.returncode == 0, installed.stderr
    return where


def test_wheel_holds_the_packages_their_data_and_the_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if ".dist-info/" in n)
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    assert wheel.name.startswith("llmq_router-")
    assert {n.split("/")[0] for n in names} == {
        "schemas",
        "producers",
        "workers",
        "llmq_cli",
        dist_info,
    }
    shipped = {f"workers/fleet/scenarios/{p.name}" for p in SCENARIOS.glob("*.toml")}
    assert {"workers/fleet/scenarios/demo.toml", "workers/fleet/scenarios/zero.toml"} <= shipped
    assert shipped | {"llmq_cli/demo.toml", f"{dist_info}/licenses/LICENSE"} <= names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert "Name: llmq-router" in headers
    assert "License-Expression: Apache-2.0" in headers
    requires = [h.removeprefix("Requires-Dist: ") for h in headers if h.startswith("Requires-Dist")]
    default = [r for r in requires if "extra ==" not in r]
    assert not [r for r in default if r.startswith("httpx")], default
    [uvloop] = [r for r in default if r.startswith("uvloop")]
    assert "sys_platform != 'win32'" in uvloop
    assert any(r.startswith("httpx") and "extra == 'httpx'" in r for r in requires)
    assert "llmq = llmq_cli.main:main" in entry_points


def test_installed_without_httpx_it_names_the_extra(venv: Path, tmp_path: Path) -> None:
    """The default install has no httpx; choosing an httpx transport says what to install."""
    python, llmq = venv / "bin" / "python", venv / "bin" / "llmq"
    probe = "import importlib.util as u; print(u.find_spec('httpx') is None)"
    assert run(python, "-c", probe, cwd=tmp_path, env=clean_env()).stdout.strip() == "True"
    version = run(llmq, "--version", cwd=tmp_path, env=clean_env())
    assert version.returncode == 0 and "0.1.0" in version.stdout, version.stderr
    config = tmp_path / "llmq.toml"
    config.write_text('[worker]\nhttp_transport = "httpx"\n')
    worker = run(llmq, "worker", "--config", config, cwd=tmp_path, env=clean_env())
    assert worker.returncode == 1
    assert "llmq-router[httpx]" in worker.stderr and "Traceback" not in worker.stderr


@pytest.fixture
def demo_topology(names: dict[str, str], amqp_url: str) -> Iterator[dict[str, str]]:
    """The demo's broker objects, named for this test and deleted after it."""
    topology = {**names, "state_exchange": f"{names['jobs_exchange']}.state"}
    yield topology

    async def delete() -> None:
        objects = plan(TopologySettings(**topology))
        connection = await aio_pika.connect(amqp_url)
        try:
            channel = await connection.channel()
            for queue in objects.queues:
                await channel.queue_delete(queue.name)
            for exchange in objects.exchanges:
                await channel.exchange_delete(exchange.name)
        finally:
            await connection.close()

    asyncio.run(delete())


@pytest.mark.rabbitmq
def test_installed_wheel_runs_the_demo(
    venv: Path, amqp_url: str, demo_topology: dict[str, str], tmp_path: Path
) -> None:
    """``llmq demo`` from the installed wheel: its config and fleet are package data."""
    env = clean_env(
        LLMQ_BROKER__URL=amqp_url,
        **{f"LLMQ_TOPOLOGY__{k.upper()}": v for k, v in demo_topology.items()},
    )
    result = run(
        venv / "bin" / "llmq", "demo", "--jobs", "200", "--json", cwd=tmp_path, env=env, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert summary["jobs"] == 200 and summary["lost"] == 0, summary
    # The 5 jobs for an unknown model are answered with an error and dead-lettered.
    assert summary["ok"] >= 100 and summary["dead_letters"] >= 5, summary
