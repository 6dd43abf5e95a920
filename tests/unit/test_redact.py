"""Upstream error text is scrubbed of keys before it reaches replies, logs or dead letters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.secrets import redact

KEY = "sk-SENTINEL-0123456789abcdef"


@pytest.mark.parametrize(
    "text",
    [
        f"Incorrect API key provided: {KEY}",
        f"Incorrect API key provided: {KEY[:3]}********************{KEY[-4:]}.",
        "Authorization: Bearer whatever.token",
        "retry with api_key=abc123 please",
        f"...{KEY[-8:]}",
    ],
)
def test_keys_and_their_echoes_are_removed(text: str) -> None:
    out = redact(text, [KEY])
    assert KEY not in out
    assert KEY[-4:] not in out
    assert "[redacted]" in out


@pytest.mark.parametrize(
    "text", ["model gpt-4.1-mini not found", "The server had an error", "task-queue overloaded"]
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact(text, [KEY]) == text


@given(prefix=st.text(max_size=50), suffix=st.text(max_size=50))
def test_the_key_never_survives_whatever_surrounds_it(prefix: str, suffix: str) -> None:
    assert KEY not in redact(prefix + KEY + suffix, [KEY])
