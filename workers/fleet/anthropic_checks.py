"""The shapes of a Messages request's parts, as Anthropic's reference states them.

Each check raises :class:`Invalid` with the message Anthropic would give (a
field path, then what is wrong); :mod:`workers.fleet.anthropic_wire` answers it
as a 400 ``invalid_request_error``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["Invalid", "system", "tool_choice", "tools", "turns"]

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_BLOCKS = {"user": {"text", "image", "tool_result", "document"}, "assistant": {"text", "tool_use"}}
"""The content blocks each role may send."""


class Invalid(Exception):
    """The request breaks one of the Messages API's rules; ``str()`` says which."""


def tools(value: Any) -> list[dict[str, Any]]:
    """Client tools: ``{name, description?, input_schema, cache_control?}``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Invalid("tools: Input should be a valid list")
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise Invalid(f"tools.{i}: Input should be an object")
        extra = set(tool) - {"name", "description", "input_schema", "cache_control", "type"}
        if extra:
            raise Invalid(f"tools.{i}.{sorted(extra)[0]}: Extra inputs are not permitted")
        if not isinstance(tool.get("name"), str) or not _TOOL_NAME.match(tool["name"]):
            raise Invalid(f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise Invalid(f"tools.{i}.input_schema: a JSON schema of type object is required")
    return list(value)


def system(value: Any) -> list[dict[str, Any]]:
    """The system prompt as text blocks (a string is one)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        for i, block in enumerate(value):
            _text(block, f"system.{i}")
        return list(value)
    raise Invalid("system: Input should be a string or a list of text blocks")


def turns(messages: Any) -> list[list[dict[str, Any]]]:
    """Each turn's content blocks, after checking roles, order and tool pairing."""
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: Field required (at least one message)")
    out: list[list[dict[str, Any]]] = []
    pending: set[str] = set()  # tool_use ids the next user turn must answer
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _BLOCKS:
            raise Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if set(message) - {"role", "content"}:
            raise Invalid(f"{where}: Extra inputs are not permitted")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise Invalid(
                'messages: roles must alternate between "user" and "assistant",'
                f" starting with user (messages.{i} is {role})"
            )
        blocks = _content(message.get("content"), role, where)
        if pending:
            answered = [b["tool_use_id"] for b in blocks if b["type"] == "tool_result"]
            if set(answered) != pending or any(
                b["type"] != "tool_result" for b in blocks[: len(answered)]
            ):
                raise Invalid(
                    f"{where}: tool_use ids were found without tool_result blocks immediately"
                    " after; each tool_use needs a tool_result at the start of the next message"
                )
        elif any(b["type"] == "tool_result" for b in blocks):
            raise Invalid(f"{where}: unexpected tool_use_id found in tool_result blocks")
        pending = {b["id"] for b in blocks if b["type"] == "tool_use"}
        out.append(blocks)
    return out


def _content(content: Any, role: str, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise Invalid(f"{where}: all messages must have non-empty content")
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in _BLOCKS[role]:
            raise Invalid(f"{at}.type: {kind!r} is not a {role} content block")
        if kind == "text":
            _text(block, at)
        elif kind == "image":
            _image(block.get("source"), at)
        elif kind == "tool_use" and not (
            isinstance(block.get("id"), str)
            and isinstance(block.get("name"), str)
            and isinstance(block.get("input"), dict)
        ):
            raise Invalid(f"{at}: tool_use needs an id, a name and an input object")
        elif kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
            raise Invalid(f"{at}.tool_use_id: Field required")
    return list(content)


def _text(block: Any, where: str) -> None:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise Invalid(f"{where}: Input should be a text block")
    if not isinstance(block.get("text"), str) or not block["text"]:
        raise Invalid(f"{where}: text content blocks must be non-empty")
    if set(block) - {"type", "text", "cache_control"}:
        raise Invalid(f"{where}: Extra inputs are not permitted")


def _image(source: Any, where: str) -> None:
    kind = source.get("type") if isinstance(source, dict) else None
    media, data = (source.get("media_type"), source.get("data")) if kind else (None, None)
    if kind == "base64" and media in _IMAGE_TYPES and isinstance(data, str) and data:
        return
    if kind == "url" and str(source.get("url", "")).startswith(("http://", "https://")):
        return
    raise Invalid(f"{where}.source: a base64 image (jpeg, png, gif, webp) or a url source")


def tool_choice(choice: Any, offered: list[Any]) -> dict[str, Any] | None:
    """``{type: auto|any|tool|none}``; ``tool`` names one of the ``offered`` tools."""
    if choice is None:
        return None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise Invalid("tool_choice: Input should be an object of type auto, any, tool or none")
    if kind == "tool" and not isinstance(choice.get("name"), str):
        raise Invalid("tool_choice.name: Field required")
    if kind in ("any", "tool") and not offered:
        raise Invalid("tool_choice: may only be specified while providing tools")
    if kind == "tool" and choice["name"] not in {t["name"] for t in offered}:
        raise Invalid(f"tool_choice.name: no tool named {choice['name']!r}")
    return dict(choice)
