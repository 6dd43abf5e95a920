"""Model kinds in the settings and at intake: a chat job never reaches an
embeddings path, nor an embedding job a chat path."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import ConfigError, Settings, load_settings
from workers.intake import admission

CHAT_AND_EMBED = """
[[endpoints]]
name = "chat"
base_url = "http://127.0.0.1:1/v1"
models = ["gpt-4.1-mini"]

[[endpoints]]
name = "embed"
base_url = "http://127.0.0.1:1/v1"
  [endpoints.models]
  "text-embedding-3-small" = { upstream = "text-embedding-3-small", kind = "embedding" }
"""


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "llmq.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_models_declare_their_kind(tmp_path: Path) -> None:
    settings = load(tmp_path, CHAT_AND_EMBED)
    assert settings.model_kind("text-embedding-3-small") == "embedding"
    assert settings.model_kind("gpt-4.1-mini") == "chat"


def test_an_endpoint_serves_one_kind(tmp_path: Path) -> None:
    text = """
[[endpoints]]
name = "both"
base_url = "http://127.0.0.1:1/v1"
  [endpoints.models]
  "gpt-4.1-mini" = "gpt-4.1-mini"
  "text-embedding-3-small" = { upstream = "text-embedding-3-small", kind = "embedding" }
"""
    message = error(tmp_path, text)
    assert "endpoints.0.models" in message and "of their own" in message


def test_a_model_has_one_kind_everywhere(tmp_path: Path) -> None:
    text = (
        CHAT_AND_EMBED
        + """
[[endpoints]]
name = "other"
base_url = "http://127.0.0.1:1/v1"
models = ["text-embedding-3-small"]
"""
    )
    message = error(tmp_path, text)
    assert "endpoints.2.models.text-embedding-3-small.kind" in message


def test_a_fallback_is_of_the_same_kind(tmp_path: Path) -> None:
    text = (
        CHAT_AND_EMBED
        + """
[models."gpt-4.1-mini"]
fallbacks = ["text-embedding-3-small"]
"""
    )
    assert "models.gpt-4.1-mini.fallbacks" in error(tmp_path, text)


@pytest.mark.parametrize(
    ("model", "kind", "refused"),
    [
        ("gpt-4.1-mini", "chat", False),
        ("gpt-4.1-mini", "embedding", True),
        ("text-embedding-3-small", "embedding", False),
        ("text-embedding-3-small", "chat", True),
    ],
)
def test_intake_refuses_a_job_of_the_other_kind(
    tmp_path: Path, model: str, kind: str, refused: bool
) -> None:
    rules = admission(load(tmp_path, CHAT_AND_EMBED))
    why = rules.limit(model, None, 1, kind)
    assert (why is not None) is refused
    assert why is None or f"a {kind} job" in why
