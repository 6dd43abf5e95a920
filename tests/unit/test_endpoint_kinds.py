"""Endpoint kinds in the configuration: what loads, and what is refused with which line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from schemas import ConfigError, load_settings

KEY = "sk-azure-unit-0123456789"
SECRET = "relay-secret-value-42"

AZURE = """
[[endpoints]]
name = "az"
kind = "azure"
base_url = "https://res.openai.azure.com"
api_version = "2024-10-21"
api_key_env = "KINDS_KEY"
models = { "gpt-4.1" = "my-gpt41" }
{extra}
"""


def azure(extra: str = "") -> str:
    return AZURE.replace("{extra}", extra)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LLMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KINDS_KEY", KEY)
    monkeypatch.setenv("KINDS_SECRET", SECRET)


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "llmq.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def refused(tmp_path: Path, text: str) -> str:
    """The one config error line ``text`` gives."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith("config error: ") and message.count("\n") == 0, message
    return message


def test_an_azure_endpoint_loads(tmp_path: Path) -> None:
    extra = """headers = { "X-Team" = "search" }
secret_headers = { "X-Relay-Token" = "KINDS_SECRET" }
query = { "trace" = "1" }"""
    settings = load(tmp_path, azure(extra))
    [endpoint] = settings.endpoints  # type: ignore[attr-defined]
    assert (endpoint.kind, endpoint.api_version) == ("azure", "2024-10-21")
    assert endpoint.api_key.get_secret_value() == KEY
    assert endpoint.headers == {"X-Team": "search"} and endpoint.query == {"trace": "1"}
    assert endpoint.secret_header_values["X-Relay-Token"].get_secret_value() == SECRET
    assert SECRET not in repr(endpoint) and SECRET not in str(endpoint.model_dump())


def test_kind_defaults_to_openai(tmp_path: Path) -> None:
    text = '[[endpoints]]\nname = "a"\nbase_url = "https://api.openai.com/v1"\nmodels = ["m"]\n'
    [endpoint] = load(tmp_path, text).endpoints  # type: ignore[attr-defined]
    assert endpoint.kind == "openai" and endpoint.headers == {} and endpoint.api_version is None


def test_the_classic_azure_url_says_where_its_parts_go(tmp_path: Path) -> None:
    """The issue's URL: refused, and the message is the fix."""
    url = "https://res.openai.azure.com/openai/deployments/my-gpt41?api-version=2024-10-21"
    text = f'[[endpoints]]\nname = "a"\nbase_url = "{url}"\nmodels = ["gpt-4.1"]\n'
    message = refused(tmp_path, text)
    assert "endpoints.0.base_url" in message
    for part in (
        'kind = "azure"',
        'base_url = "https://res.openai.azure.com"',
        'api_version = "2024-10-21"',
        '"my-gpt41"',
        "models.<name>.upstream",
    ):
        assert part in message, message


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (
            (
                'base_url = "https://res.openai.azure.com"',
                'base_url = "https://r.example/v1?k=s3cr3t"',
            ),
            "base_url",
            "query =",
        ),
        (
            ('base_url = "https://res.openai.azure.com"', 'base_url = "https://r.example/v1#x"'),
            "base_url",
            "fragment",
        ),
        (
            (
                'base_url = "https://res.openai.azure.com"',
                'base_url = "https://res.openai.azure.com/openai/deployments/my-gpt41"',
            ),
            "base_url",
            'put the deployment "my-gpt41" in models.<name>.upstream',
        ),
        (
            ('base_url = "https://res.openai.azure.com"', 'base_url = "https://res.example/v1"'),
            "base_url",
            "resource root",
        ),
        (('api_version = "2024-10-21"', ""), "api_version", "kind azure needs"),
        (
            ('api_key_env = "KINDS_KEY"', 'api_key_env = "KINDS_KEY"\nazure_ad_token_env = "T"'),
            "azure_ad_token_env",
            "not both",
        ),
        (
            ('api_key_env = "KINDS_KEY"', 'api_key_env = "NOT_SET_ANYWHERE"'),
            "api_key_env",
            "not set",
        ),
    ],
)
def test_azure_mistakes(tmp_path: Path, change: tuple[str, str], field: str, says: str) -> None:
    text = azure().replace(*change)
    message = refused(tmp_path, text)
    assert f"endpoints.0.{field}: " in message and says in message, message
    assert "s3cr3t" not in message  # a query string may hold a secret: never quoted


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ('headers = { "api-key" = "x" }', "headers", "carries the key of kind azure"),
        ('headers = { "Authorization" = "Bearer x" }', "headers", "azure_ad_token_env"),
        ('headers = { "Content-Type" = "text/plain" }', "headers", "set by llmq"),
        ('headers = { "Bad Header" = "x" }', "headers", "not a valid header name"),
        ('headers = { "X-A" = "a\\r\\nX-Evil: 1" }', "headers", "CR, LF"),
        ('secret_headers = { "X-A" = "not an env" }', "secret_headers", "environment variable"),
        ('secret_headers = { "X-A" = "UNSET_ENV_VAR_9" }', "secret_headers.X-A", "not set"),
        (
            'headers = { "X-A" = "1" }\nsecret_headers = { "x-a" = "KINDS_SECRET" }',
            "secret_headers",
            "also in headers",
        ),
        ('query = { "api-version" = "2024-10-21" }', "query", "api_version"),
        ('api_key = "sk-inline"', "api_key", "keys never go in the config"),
    ],
)
def test_header_and_query_mistakes(tmp_path: Path, extra: str, field: str, says: str) -> None:
    message = refused(tmp_path, azure(extra))
    assert f"endpoints.0.{field}: " in message and says in message, message


def test_a_secret_header_value_with_a_newline_is_refused_unquoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KINDS_SECRET", "abc\r\nX-Evil: 1")
    extra = 'secret_headers = { "X-Relay-Token" = "KINDS_SECRET" }'
    message = refused(tmp_path, azure(extra))
    assert "secret_headers.X-Relay-Token" in message and "X-Evil" not in message


def test_openai_kind_refusals(tmp_path: Path) -> None:
    base = '[[endpoints]]\nname = "a"\nbase_url = "https://api.openai.com/v1"\nmodels = ["m"]\n'
    assert "endpoints.0.headers: 'authorization' carries the key of kind openai" in refused(
        tmp_path, base + 'headers = { "authorization" = "Bearer x" }\n'
    )
    assert "endpoints.0.api_version: is for kind azure" in refused(
        tmp_path, base + 'api_version = "2024-10-21"\n'
    )
    assert "endpoints.0.azure_ad_token_env: is for kind azure" in refused(
        tmp_path, base + 'azure_ad_token_env = "KINDS_KEY"\n'
    )
    deployment = base.replace("/v1", "/openai/deployments/my-gpt41")
    assert 'kind = "azure"' in refused(tmp_path, deployment)


def test_anthropic_endpoints_serve_no_embeddings(tmp_path: Path) -> None:
    text = """
[[endpoints]]
name = "claude"
kind = "anthropic"
base_url = "https://api.anthropic.com"
models = { "emb" = { upstream = "e", kind = "embedding" } }
"""
    message = refused(tmp_path, text)
    assert "endpoints.0.models: " in message and "chat models only" in message


def test_tables_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LLMQ_ENDPOINTS__0__HEADERS='{...}' overrides one endpoint's table."""
    monkeypatch.setenv("LLMQ_ENDPOINTS__0__HEADERS", '{"X-From-Env": "1"}')
    monkeypatch.setenv("LLMQ_ENDPOINTS__0__QUERY", '{"q": "2"}')
    [endpoint] = load(tmp_path, azure()).endpoints  # type: ignore[attr-defined]
    assert endpoint.headers == {"X-From-Env": "1"} and endpoint.query == {"q": "2"}
