"""load_settings: the TOML file, LLMQ_* overrides, secrets and one-line errors."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from schemas import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "demo" / "llmq.example.toml"
KEY = "sk-test-0123456789abcdef"

BASE = """
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/"
heartbeat_s = 10

[worker]
concurrency = 32

[models."gpt-4.1"]
aliases = ["gpt4"]
fallbacks = ["gpt-4.1-mini"]

[[endpoints]]
name = "a"
base_url = "http://127.0.0.1:18101/v1/"
api_key_env = "LLMQ_TEST_KEY_A"
models = ["gpt-4.1-mini", "gpt-4.1"]
input_per_mtok = 0.4
output_per_mtok = 1.6

[[endpoints]]
name = "b"
base_url = "https://relay.example/v1"
max_concurrency = 8
  [endpoints.models]
  "gpt-4.1-mini" = "openai/gpt-4.1-mini"
  "gpt-4.1" = { upstream = "openai/gpt-4.1", input_per_mtok = 2.0, output_per_mtok = 8.0 }
"""

ENDPOINT = """
[[endpoints]]
name = "{name}"
base_url = "{url}"
models = ["m"]
"""

WriteToml = Callable[[str], Path]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LLMQ_* variable of the machine leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("LLMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LLMQ_TEST_KEY_A", KEY)


@pytest.fixture
def write_toml(tmp_path: Path) -> WriteToml:
    def write(text: str) -> Path:
        path = tmp_path / "llmq.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def config_error(path: Path, field: str) -> str:
    """Load, expect a ConfigError of one line naming ``field``; return the line."""
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith("config error: ")
    assert field in text, text
    assert str(path) in text
    return text


# --- loading --------------------------------------------------------------------


def test_defaults_without_file() -> None:
    """With no file and no variables, the defaults apply."""
    settings = load_settings()
    assert settings.broker.url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.endpoints == []
    assert settings.topology.jobs_exchange == "llmq.jobs"
    assert settings.topology.queue_name("batch") == "llmq.q.batch"
    assert settings.topology.classes["interactive"].default_sla_ms == 30_000
    assert settings.topology.classes["interactive"].hedge is True
    assert settings.topology.classes["batch"].default_sla_ms == 3_600_000
    assert settings.log_level == "info"


def test_load_from_file(write_toml: WriteToml) -> None:
    """Every section of the file is read; model shorthands expand."""
    settings = load_settings(write_toml(BASE))
    assert settings.broker.heartbeat_s == 10
    assert settings.worker.concurrency == 32
    a, b = settings.endpoints
    assert a.name == "a"
    assert a.base_url == "http://127.0.0.1:18101/v1"
    assert {k: v.upstream for k, v in a.models.items()} == {
        "gpt-4.1-mini": "gpt-4.1-mini",
        "gpt-4.1": "gpt-4.1",
    }
    assert b.models["gpt-4.1-mini"].upstream == "openai/gpt-4.1-mini"
    # Prices are read as given; unset is None (the price decision: tests/unit/test_prices.py).
    gpt41 = b.models["gpt-4.1"]
    assert (gpt41.input_per_mtok, gpt41.output_per_mtok, gpt41.cached_input_per_mtok) == (
        2.0,
        8.0,
        None,
    )
    assert b.input_per_mtok is b.output_per_mtok is b.models["gpt-4.1-mini"].input_per_mtok is None
    assert (a.input_per_mtok, a.output_per_mtok) == (0.4, 1.6)
    assert b.max_concurrency == 8
    assert settings.canonical("gpt4") == "gpt-4.1"
    assert settings.canonical("gpt-4.1") == "gpt-4.1"
    assert settings.canonical("other") == "other"
    assert settings.models["gpt-4.1"].fallbacks == ["gpt-4.1-mini"]
    assert settings.served_models() == ["gpt-4.1", "gpt-4.1-mini"]


def test_config_from_environment_variable(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMQ_CONFIG names the file when no path is given."""
    monkeypatch.setenv("LLMQ_CONFIG", str(write_toml(BASE)))
    assert [e.name for e in load_settings().endpoints] == ["a", "b"]


def test_explicit_path_wins_over_llmq_config(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An explicit path (--config) wins over $LLMQ_CONFIG."""
    monkeypatch.setenv("LLMQ_CONFIG", str(tmp_path / "missing.toml"))
    assert load_settings(write_toml(BASE)).worker.concurrency == 32


def test_keyword_overrides_win(write_toml: WriteToml) -> None:
    """load_settings(**overrides) wins over the file."""
    settings = load_settings(write_toml(BASE), log_level="debug")
    assert settings.log_level == "debug"


def test_one_class_tuned_keeps_the_other(write_toml: WriteToml) -> None:
    """A [topology.classes.X] table changes only what it names."""
    settings = load_settings(write_toml("[topology.classes.interactive]\ndefault_sla_ms = 5000\n"))
    interactive = settings.topology.classes["interactive"]
    assert interactive.default_sla_ms == 5000
    assert interactive.hedge is True
    assert interactive.max_length == 100_000
    assert settings.topology.classes["batch"].default_sla_ms == 3_600_000


def test_settings_are_frozen(write_toml: WriteToml) -> None:
    """Settings cannot be changed after loading."""
    settings = load_settings(write_toml(BASE))
    with pytest.raises(ValueError):
        settings.worker.concurrency = 1  # type: ignore[misc]


# --- environment overrides ------------------------------------------------------


def test_env_overrides_file(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMQ_* variables override the file."""
    monkeypatch.setenv("LLMQ_LOG_LEVEL", "warning")
    assert load_settings(write_toml(BASE)).log_level == "warning"


def test_nested_env_overrides_one_field(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMQ_SECTION__FIELD changes one field and keeps the rest of the section."""
    monkeypatch.setenv("LLMQ_BROKER__URL", "amqps://u:p@rabbit.internal:5671/llmq")
    monkeypatch.setenv("LLMQ_WORKER__MAX_ATTEMPTS", "5")
    monkeypatch.setenv("LLMQ_TOPOLOGY__CLASSES__BATCH__MAX_LENGTH", "7")
    settings = load_settings(write_toml(BASE))
    assert settings.broker.url.get_secret_value() == "amqps://u:p@rabbit.internal:5671/llmq"
    assert settings.broker.heartbeat_s == 10
    assert settings.worker.max_attempts == 5
    assert settings.worker.concurrency == 32
    assert settings.topology.classes["batch"].max_length == 7
    assert settings.topology.classes["interactive"].hedge is True


def test_env_overrides_one_endpoint_by_index(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMQ_ENDPOINTS__<i>__FIELD changes endpoint i and keeps the file's list."""
    monkeypatch.setenv("LLMQ_ENDPOINTS__1__MAX_CONCURRENCY", "99")
    monkeypatch.setenv("LLMQ_ENDPOINTS__0__MODELS", '["gpt-4.1"]')
    settings = load_settings(write_toml(BASE))
    a, b = settings.endpoints
    assert (a.name, b.name) == ("a", "b")
    assert b.max_concurrency == 99
    assert b.models["gpt-4.1"].upstream == "openai/gpt-4.1"
    assert list(a.models) == ["gpt-4.1"]
    assert a.api_key is not None


def test_env_endpoint_index_gap(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint index past the end of the list is an error, not a silent no-op."""
    monkeypatch.setenv("LLMQ_ENDPOINTS__3__MAX_CONCURRENCY", "9")
    text = config_error(write_toml(BASE), "endpoints")
    assert "endpoint 3" in text


def test_env_endpoints_json_replaces_list(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLMQ_ENDPOINTS as JSON replaces the whole list."""
    monkeypatch.setenv(
        "LLMQ_ENDPOINTS",
        '[{"name": "z", "base_url": "http://z:1/v1", "models": ["gpt-4.1", "gpt-4.1-mini"]}]',
    )
    settings = load_settings(write_toml(BASE))
    assert [e.name for e in settings.endpoints] == ["z"]


def test_env_only_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint can be declared from the environment alone."""
    monkeypatch.setenv("LLMQ_ENDPOINTS__0__NAME", "solo")
    monkeypatch.setenv("LLMQ_ENDPOINTS__0__BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLMQ_ENDPOINTS__0__MODELS", '{"m": "upstream-m"}')
    (endpoint,) = load_settings().endpoints
    assert endpoint.name == "solo"
    assert endpoint.models["m"].upstream == "upstream-m"


def test_env_models_json(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    """[models] entries can be given as JSON; they merge into the file's."""
    monkeypatch.setenv("LLMQ_MODELS", '{"gpt-4.1": {"aliases": ["g4"]}}')
    settings = load_settings(write_toml(BASE))
    assert settings.models["gpt-4.1"].aliases == ["g4"]
    assert settings.models["gpt-4.1"].fallbacks == ["gpt-4.1-mini"]


def test_bad_env_value_names_the_field(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad value from the environment is a one-line error naming the field."""
    monkeypatch.setenv("LLMQ_WORKER__CONCURRENCY", "lots")
    config_error(write_toml(BASE), "worker.concurrency")


# --- secrets --------------------------------------------------------------------


def test_api_key_read_from_env_as_secret(write_toml: WriteToml) -> None:
    """The key comes from the named variable, as a SecretStr."""
    a, b = load_settings(write_toml(BASE)).endpoints
    assert isinstance(a.api_key, SecretStr)
    assert a.api_key.get_secret_value() == KEY
    assert b.api_key is None


def test_api_key_never_printed(write_toml: WriteToml) -> None:
    """Neither the key nor the broker password shows in repr, str or dumps."""
    settings = load_settings(write_toml(BASE))
    endpoint = settings.endpoints[0]
    texts = [
        repr(settings),
        str(settings),
        repr(endpoint),
        str(endpoint),
        str(settings.model_dump()),
        settings.model_dump_json(),
        str(endpoint.model_dump()),
        endpoint.model_dump_json(),
        repr(endpoint.api_key),
        str(endpoint.api_key),
    ]
    for text in texts:
        assert KEY not in text
        assert "guest:guest" not in text
    assert "api_key" not in endpoint.model_dump()
    assert "LLMQ_TEST_KEY_A" in repr(endpoint)


def test_missing_key_variable(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    """A named but unset variable is an error naming endpoints.N.api_key_env."""
    monkeypatch.delenv("LLMQ_TEST_KEY_A")
    text = config_error(write_toml(BASE), "endpoints.0.api_key_env")
    assert "LLMQ_TEST_KEY_A" in text


def test_empty_key_variable(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty variable counts as unset."""
    monkeypatch.setenv("LLMQ_TEST_KEY_A", "")
    config_error(write_toml(BASE), "endpoints.0.api_key_env")


def test_api_key_in_file_refused(write_toml: WriteToml) -> None:
    """A key written in the file is refused, and not echoed."""
    toml = (
        '[[endpoints]]\nname = "a"\nbase_url = "http://h/v1"\napi_key = "sk-leak"\nmodels = ["m"]\n'
    )
    text = config_error(write_toml(toml), "endpoints.0.api_key")
    assert "sk-leak" not in text


def test_api_key_from_env_override_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key given through LLMQ_ENDPOINTS… is refused too."""
    monkeypatch.setenv(
        "LLMQ_ENDPOINTS",
        '[{"name": "a", "base_url": "http://h/v1", "api_key": "sk-leak", "models": ["m"]}]',
    )
    with pytest.raises(ConfigError, match=r"endpoints\.0\.api_key") as info:
        load_settings()
    assert "sk-leak" not in str(info.value)


# --- one-line errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[broker]\nurl = "http://rabbit:5672/"\n', "broker.url"),
        ('[broker]\nurl = "not a url"\n', "broker.url"),
        ("[broker]\nheartbeat_s = -1\n", "broker.heartbeat_s"),
        (ENDPOINT.format(name="a", url="ftp://h/v1"), "endpoints.0.base_url"),
        (ENDPOINT.format(name="a", url="h:80/v1"), "endpoints.0.base_url"),
        (ENDPOINT.format(name="a", url="http:///v1"), "endpoints.0.base_url"),
        (ENDPOINT.format(name="a", url="http://user:pw@h/v1"), "endpoints.0.base_url"),
        (ENDPOINT.format(name="a b", url="http://h/v1"), "endpoints.0.name"),
        (ENDPOINT.format(name="a", url="http://h") + 'api_key_env = "1BAD"\n', "api_key_env"),
        (ENDPOINT.format(name="a", url="http://h") + "max_concurrency = 0\n", "max_concurrency"),
        (ENDPOINT.format(name="a", url="http://h") + "timeout_s = 0\n", "timeout_s"),
        (ENDPOINT.format(name="a", url="http://h") + "rpm = 0\n", "endpoints.0.rpm"),
        (ENDPOINT.format(name="a", url="http://h") + "input_per_mtok = -1\n", "input_per_mtok"),
        ('[[endpoints]]\nname = "a"\nbase_url = "http://h"\nmodels = []\n', "endpoints.0.models"),
        ('[[endpoints]]\nname = "a"\nbase_url = "http://h"\n', "endpoints.0.models"),
        ('[[endpoints]]\nbase_url = "http://h"\nmodels = ["m"]\n', "endpoints.0.name"),
        (
            ENDPOINT.format(name="a", url="http://h") + ENDPOINT.format(name="a", url="http://i"),
            "endpoints.1.name",
        ),
        (ENDPOINT.format(name="a", url="http://h") + '[models.m]\naliases = ["m"]\n', "aliases"),
        (
            ENDPOINT.format(name="a", url="http://h")
            + '[models.m]\naliases = ["x"]\n[models.n]\naliases = ["x"]\n',
            "models.n.aliases",
        ),
        (
            ENDPOINT.format(name="a", url="http://h") + '[models.m]\nfallbacks = ["zz"]\n',
            "models.m.fallbacks",
        ),
        ("[topology.classes.urgent]\ndefault_sla_ms = 5\n", "topology.classes"),
        ("[topology.classes.batch]\ndefault_sla_ms = 0\n", "default_sla_ms"),
        ('[topology]\njobs_exchange = "bad name"\n', "topology.jobs_exchange"),
        ("[topology]\ndelivery_limit = 0\n", "topology.delivery_limit"),
        ("concurrency = 3\n", "concurrency"),
        ("[worker]\nconcurent = 3\n", "worker.concurent"),
        ("[workers]\nconcurrency = 3\n", "workers"),
        ('[worker]\nhttp_transport = "curl"\n', "worker.http_transport"),
        ('log_level = "loud"\n', "log_level"),
    ],
)
def test_invalid_config_one_line(write_toml: WriteToml, toml: str, field: str) -> None:
    """Each invalid setting is one ConfigError line naming the field."""
    text = config_error(write_toml(toml), field)
    assert "Value error," not in text


def test_alias_conflict_names_both_models(write_toml: WriteToml) -> None:
    """An alias given twice names the model that has it already."""
    toml = (
        ENDPOINT.format(name="a", url="http://h")
        + '[models.m]\naliases = ["x"]\n[models.n]\naliases = ["x"]\n'
    )
    assert "'m'" in config_error(write_toml(toml), "models.n.aliases")


def test_alias_must_not_be_a_served_model(write_toml: WriteToml) -> None:
    """An alias that is a served model name would be ambiguous."""
    toml = BASE + '[models."gpt-4.1-mini"]\naliases = ["gpt-4.1"]\n'
    config_error(write_toml(toml), "models.gpt-4.1-mini.aliases")


def test_several_problems_one_line_each(write_toml: WriteToml) -> None:
    """Every problem gets its own line."""
    path = write_toml("[worker]\nconcurrency = 0\nmax_attempts = 99\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith("config error: worker.") for line in lines)


def test_toml_syntax_error(write_toml: WriteToml) -> None:
    """A TOML syntax error is a ConfigError with the position, not a traceback."""
    text = config_error(write_toml("[broker\nurl = 1\n"), "line 1")
    assert re.search(r"line \d+, column \d+", text)


def test_not_utf8_file(write_toml: WriteToml, tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'log_level = "\xe9"\n')
    with pytest.raises(ConfigError):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_missing_file_from_llmq_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$LLMQ_CONFIG pointing nowhere is an error, not a fallback to defaults."""
    monkeypatch.setenv("LLMQ_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    """A directory is not a config file."""
    with pytest.raises(ConfigError):
        load_settings(tmp_path)


def test_loading_is_reentrant(write_toml: WriteToml) -> None:
    """A failed load leaves no state behind for the next one."""
    with pytest.raises(ConfigError):
        load_settings(write_toml("[broker\n"))
    assert load_settings().endpoints == []
    assert Settings().endpoints == []


# --- the shipped examples ---------------------------------------------------------------


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/demo/llmq.example.toml is valid and describes the demo fleet."""
    monkeypatch.setenv("LLMQ_FLEET_KEY", "sk-fleet-demo")
    settings = load_settings(EXAMPLE)
    assert [e.base_url for e in settings.endpoints] == [
        f"http://127.0.0.1:{port}/v1" for port in range(18101, 18105)
    ]
    assert {e.api_key_env for e in settings.endpoints} == {"LLMQ_FLEET_KEY"}
    assert all(
        e.api_key is not None and e.api_key.get_secret_value() == "sk-fleet-demo"
        for e in settings.endpoints
    )
    assert settings.served_models() == ["gpt-4.1", "gpt-4.1-mini"]
    assert all(set(e.models) == {"gpt-4.1", "gpt-4.1-mini"} for e in settings.endpoints)
    assert settings.canonical("gpt4") == "gpt-4.1"
    assert settings.models["gpt-4.1"].fallbacks == ["gpt-4.1-mini"]
    assert settings.topology.classes["interactive"].hedge is True


def test_example_config_needs_the_key() -> None:
    """Without LLMQ_FLEET_KEY the example refuses to load."""
    with pytest.raises(ConfigError, match=r"endpoints\.0\.api_key_env: .*LLMQ_FLEET_KEY"):
        load_settings(EXAMPLE)


def test_configuration_doc_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example in docs/configuration.md is valid."""
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = doc.split("## Example", 1)[1]
    toml = re.search(r"```toml\n(.*?)```", section, re.S)
    assert toml is not None
    monkeypatch.setenv("OPENAI_API_KEY", "sk-doc")
    path = tmp_path / "doc.toml"
    path.write_text(toml.group(1), encoding="utf-8")
    settings = load_settings(path)
    assert settings.canonical("gpt4") == "gpt-4.1"
    assert settings.topology.classes["batch"].default_sla_ms == 3_600_000


def test_configuration_doc_names_every_field() -> None:
    """docs/configuration.md documents every settings field."""
    from schemas.settings import (
        BrokerSettings,
        ClassSettings,
        EndpointModel,
        EndpointSettings,
        ModelSettings,
        TopologySettings,
        WorkerSettings,
    )

    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    models = [
        Settings,
        BrokerSettings,
        TopologySettings,
        ClassSettings,
        WorkerSettings,
        EndpointSettings,
        EndpointModel,
        ModelSettings,
    ]
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name in m.model_fields
        if f"`{name}`" not in doc
        and not re.search(rf"\[{name}\]|\[\[{name}\]\]|\.{name}[.\]]", doc)
    ]
    assert missing == []
