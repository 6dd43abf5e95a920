"""httpx is an extra (``llmq-router[httpx]``): the default install neither
needs nor loads it, and choosing an httpx transport without it stops the
command with one line that names the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmq_cli.probe import probe_command
from schemas.settings import ConfigError
from workers.command import worker_command
from workers.upstream import AiohttpUpstream, make_upstream, require_transport

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_adapter_loads_no_httpx() -> None:
    code = (
        "import sys, workers.upstream, workers.service, llmq_cli.probe;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httpx', 'httpx_aiohttp')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("transport", "missing"),
    [("httpx", "httpx"), ("httpx-aiohttp", "httpx"), ("httpx-aiohttp", "httpx_aiohttp")],
)
def test_an_httpx_transport_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, transport: str, missing: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    with pytest.raises(ConfigError) as info:
        require_transport(transport)
    message = str(info.value)
    assert "llmq-router[httpx]" in message and f"{missing} is not installed" in message
    assert "worker.http_transport" in message
    with pytest.raises(ConfigError):
        make_upstream(transport)


async def test_the_default_transport_needs_no_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    require_transport("aiohttp")
    upstream = make_upstream("aiohttp")
    assert isinstance(upstream, AiohttpUpstream)
    await upstream.aclose()


async def test_httpx_transports_work_with_the_extra() -> None:
    pytest.importorskip("httpx_aiohttp")
    for transport in ("httpx", "httpx-aiohttp"):
        require_transport(transport)
        upstream = make_upstream(transport)
        assert type(upstream).__name__ == "HttpxUpstream"
        await upstream.aclose()


@pytest.mark.parametrize("command", [worker_command, probe_command], ids=["worker", "probe"])
def test_commands_stop_before_connecting_and_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: object
) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)
    config = tmp_path / "llmq.toml"
    config.write_text(
        '[broker]\nurl = "amqp://guest:guest@127.0.0.1:1/"\n'
        '[worker]\nhttp_transport = "httpx"\n'
        '[[endpoints]]\nname = "a"\nbase_url = "http://127.0.0.1:1/v1"\nmodels = ["m"]\n'
    )
    result = CliRunner().invoke(command, ["--config", str(config)])  # type: ignore[arg-type]
    assert result.exit_code == 1, result.output
    assert "llmq-router[httpx]" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
