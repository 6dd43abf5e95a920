"""The testing kit's files are package data: the fleet's scenarios
(workers/fleet/scenarios/) and the demo's config (llmq_cli/demo.toml) are
found through ``importlib.resources``, by name, from any directory."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from schemas.settings import load_settings
from workers.fleet import ScenarioError, load_scenario, scenario_file, shipped_scenarios
from workers.fleet.command import fleet_command

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_scenarios_are_listed_by_name() -> None:
    on_disk = sorted(p.stem for p in (ROOT / "workers" / "fleet" / "scenarios").glob("*.toml"))
    assert shipped_scenarios() == ("demo", "faults", "zero") == tuple(on_disk)


@pytest.mark.parametrize("name", ["demo", "faults", "zero"])
def test_a_name_gives_the_shipped_file_from_any_directory(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with scenario_file(name) as path:
        assert path.is_absolute()
        assert load_scenario(path).endpoints
    assert path.is_file()  # the package's own file, not a temporary copy


def test_an_existing_file_wins_over_a_shipped_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text('[[endpoints]]\nname = "mine"\nmodels = ["m"]\n')
    with scenario_file("demo") as path:
        assert path == Path("demo")
        assert [e.name for e in load_scenario(path).endpoints] == ["mine"]


def test_neither_a_file_nor_a_name_lists_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"no such file, nor a shipped scenario \(demo, "):
        with scenario_file(tmp_path / "nope.toml"):
            pass
    result = CliRunner().invoke(fleet_command, ["--scenario", "nope"])
    assert result.exit_code == 1
    assert "demo, faults, zero" in result.output


def test_the_demo_config_ships_beside_the_demo_and_fits_the_demo_fleet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llmq_cli/demo.toml is package data, and its endpoints are the demo scenario's ports."""
    monkeypatch.setenv("LLMQ_FLEET_KEY", "sk-fleet-demo")
    for name in [n for n in os.environ if n.startswith("LLMQ_") and n != "LLMQ_FLEET_KEY"]:
        monkeypatch.delenv(name)
    with resources.as_file(resources.files("llmq_cli") / "demo.toml") as config:
        settings = load_settings(config)
    with scenario_file("demo") as path:
        scenario = load_scenario(path)
    ports = {e.name: e.port for e in scenario.endpoints}
    assert {e.name: urlsplit(e.base_url).port for e in settings.endpoints} == ports
    assert all(e.api_key is not None for e in settings.endpoints)
    assert {e.api_key.get_secret_value() for e in settings.endpoints if e.api_key} == {
        scenario.api_key
    }
