"""An OpenAI chat-completions request, translated to an Anthropic Messages request.

Pure: a dict in, a dict out, or :class:`Untranslatable` naming what cannot
be said in the Messages API. Every top-level request key is in one of the
tables below (translated, ignored, allowed only at its neutral value);
any other key is refused, so nothing a caller asks for is dropped unseen.

What changes shape (Anthropic's rules in brackets):

- ``system``/``developer`` messages, wherever they are → ``system`` (no system role);
- ``tool`` messages → ``tool_result`` blocks in a user turn; consecutive turns
  of one role are merged [roles alternate], tool results first [as required];
- assistant ``tool_calls`` → ``tool_use`` blocks (``arguments`` JSON-decoded);
- ``image_url`` parts → ``image`` blocks (``data:`` URLs as base64, http(s) as url);
- ``stop`` → ``stop_sequences``; ``user`` → ``metadata.user_id``;
- ``max_completion_tokens``/``max_tokens`` → ``max_tokens``, which Messages
  requires: :data:`DEFAULT_MAX_TOKENS` when the caller gave none;
- ``cache_control`` on a content part or a tool passes through (prompt caching).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

__all__ = ["DEFAULT_MAX_TOKENS", "IGNORED_KEYS", "Untranslatable", "to_messages"]

DEFAULT_MAX_TOKENS = 4096
"""``max_tokens`` sent when the job sets neither ``max_tokens`` nor
``max_completion_tokens`` (Messages requires one). The same value as
``RoutingConfig.default_max_tokens``, which the router and spend limits assume
for such a job, so the reservation made for it covers what Anthropic may bill."""

IGNORED_KEYS = frozenset(
    {"model", "stream", "stream_options", "seed", "store", "metadata", "service_tier"}
    | {"prediction", "prompt_cache_key"}
)
"""Keys dropped without effect on the answer: ``model`` is the endpoint's own
name, ``stream`` is false (the contract), the rest are OpenAI account features
or best-effort hints (``seed``) with nothing to say to Anthropic."""

_TRANSLATED = frozenset(
    {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"}
    | {"tools", "tool_choice", "parallel_tool_calls", "user"}
)
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


class Untranslatable(ValueError):
    """The request asks for something the Messages API cannot do; ``str()`` says what."""


_NEUTRAL_ONLY: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v is None or v == 1, "n > 1: Messages returns one completion"),
    "logprobs": (lambda v: not v, "logprobs: Messages returns no log probabilities"),
    "top_logprobs": (lambda v: not v, "top_logprobs: Messages returns no log probabilities"),
    "logit_bias": (lambda v: not v, "logit_bias: Messages has no token biases"),
    "presence_penalty": (lambda v: not v, "presence_penalty: Messages has no penalties"),
    "frequency_penalty": (lambda v: not v, "frequency_penalty: Messages has no penalties"),
    "modalities": (lambda v: v in (None, ["text"]), "modalities: Messages answers in text"),
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        "response_format other than text: not translated to Anthropic (use tools)",
    ),
}
"""Keys accepted only at the value that asks for nothing (``n: 1``, ``logprobs:
false``...): any other value asks for what Messages cannot give."""


def to_messages(request: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The Messages request body for an OpenAI chat request sent to ``model``."""
    for key, value in request.items():
        neutral = _NEUTRAL_ONLY.get(key)
        if neutral is not None and not neutral[0](value):
            raise Untranslatable(neutral[1])
        if neutral is None and key not in IGNORED_KEYS and key not in _TRANSLATED:
            raise Untranslatable(f"{key}: not supported by the Anthropic Messages API")
    system, turns = _conversation(request.get("messages"))
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": (
            request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_MAX_TOKENS
        ),
        "messages": turns,
    }
    if system:
        body["system"] = _compact(system)
    _sampling(request, body)
    _tools(request, body)
    return body


def _sampling(request: Mapping[str, Any], body: dict[str, Any]) -> None:
    temperature = request.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or temperature > 1:
            raise Untranslatable(
                f"temperature {temperature} is above 1, the most Anthropic accepts"
                " (its range is 0 to 1, OpenAI's 0 to 2)"
            )
        body["temperature"] = temperature
    if request.get("top_p") is not None:
        body["top_p"] = request["top_p"]
    stop = request.get("stop")
    if isinstance(stop, str):
        body["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            body["stop_sequences"] = list(stop)
    elif stop is not None:
        raise Untranslatable("stop: must be a string or a list of strings")
    user = request.get("user")
    if isinstance(user, str) and user:
        body["metadata"] = {"user_id": user}


def _conversation(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The system blocks, and the turns with roles alternating from ``user``."""
    if not isinstance(messages, list):
        raise Untranslatable("messages: must be a list")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, Mapping):
            raise Untranslatable(f"{where}: must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system += _blocks(message.get("content"), where, images=False)
            continue
        if role == "user":
            blocks = _blocks(message.get("content"), where, images=True)
        elif role == "assistant":
            blocks = _assistant(message, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, where)]
        else:
            raise Untranslatable(f"{where}.role: {role!r} has no Messages equivalent")
        if not blocks:
            continue  # Messages refuses empty content; an empty message says nothing
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        raise Untranslatable(
            "messages: Anthropic needs the first message after the system ones to be the user's"
        )
    for turn in turns:
        # A tool_result must open the user turn that answers the tool_use.
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
        turn["content"] = _compact(turn["content"])
    return system, turns


def _compact(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One plain text block as a string (the common, readable form); else the blocks."""
    if len(blocks) == 1 and blocks[0]["type"] == "text" and len(blocks[0]) == 2:
        text: str = blocks[0]["text"]
        return text
    return blocks


def _blocks(content: Any, where: str, *, images: bool) -> list[dict[str, Any]]:
    """Text (and image) blocks of a message's content: a string or a list of parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content: must be a string or a list of parts")
    blocks = []
    for j, part in enumerate(content):
        block = _part(part, f"{where}.content.{j}", images=images)
        if block is not None:
            blocks.append(block)
    return blocks


def _part(part: Any, where: str, *, images: bool) -> dict[str, Any] | None:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise Untranslatable(f"{where}.{kind}: must be a string")
        if not text:
            return None
        block: dict[str, Any] = {"type": "text", "text": text}
    elif kind == "image_url" and images:
        block = {"type": "image", "source": _image_source(part.get("image_url"), where)}
    else:
        raise Untranslatable(f"{where}: a {kind!r} part is not translated to Anthropic")
    if isinstance(part.get("cache_control"), Mapping):
        block["cache_control"] = dict(part["cache_control"])
    return block


def _image_source(spec: Any, where: str) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, Mapping) else spec
    if not isinstance(url, str):
        raise Untranslatable(f"{where}.image_url.url: must be a string")
    if url.startswith(("http://", "https://")):
        return {"type": "url", "url": url}
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if comma and encoding == "base64" and media_type in _IMAGE_TYPES:
            return {"type": "base64", "media_type": media_type, "data": data}
        raise Untranslatable(
            f"{where}: a data: URL must be base64 {', '.join(sorted(_IMAGE_TYPES))}"
        )
    raise Untranslatable(f"{where}.image_url.url: must be an http(s) or data: URL")


def _assistant(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    if message.get("function_call") is not None:
        raise Untranslatable(f"{where}.function_call: the legacy form; use tool_calls")
    blocks = _blocks(message.get("content"), where, images=False)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise Untranslatable(f"{where}.tool_calls: must be a list")
    for j, call in enumerate(calls):
        blocks.append(_tool_use(call, f"{where}.tool_calls.{j}"))
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or call.get("type", "function") != "function":
        raise Untranslatable(f"{where}: only function tool calls are translated")
    call_id, name = call.get("id"), function.get("name")
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise Untranslatable(f"{where}: needs an id and a function name")
    arguments = function.get("arguments") or "{}"
    try:
        decoded = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        raise Untranslatable(f"{where}.function.arguments: not valid JSON") from None
    if not isinstance(decoded, dict):
        raise Untranslatable(f"{where}.function.arguments: must encode a JSON object")
    return {"type": "tool_use", "id": call_id, "name": name, "input": decoded}


def _tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise Untranslatable(f"{where}.tool_call_id: must be a string")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = _blocks(message.get("content"), where, images=False)
    if content:
        block["content"] = _compact(content)
    return block


def _tools(request: Mapping[str, Any], body: dict[str, Any]) -> None:
    tools = request.get("tools") or []
    if not isinstance(tools, list):
        raise Untranslatable("tools: must be a list")
    if tools:
        body["tools"] = [_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    choice = _tool_choice(request.get("tool_choice"))
    if choice is not None and choice["type"] in ("any", "tool") and not tools:
        raise Untranslatable("tool_choice: names a tool, but the request has no tools")
    if request.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None and tools:
        body["tool_choice"] = choice


def _tool(tool: Any, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(function, Mapping) or tool.get("type") != "function":
        raise Untranslatable(f"{where}: only function tools are translated")
    name = function.get("name")
    if not isinstance(name, str):
        raise Untranslatable(f"{where}.function.name: must be a string")
    out: dict[str, Any] = {"name": name}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    if isinstance(tool.get("cache_control"), Mapping):
        out["cache_control"] = dict(tool["cache_control"])
    return out


_CHOICES = {"auto": "auto", "none": "none", "required": "any"}


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _CHOICES:
        return {"type": _CHOICES[choice]}
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if isinstance(function, Mapping) and isinstance(function.get("name"), str):
        return {"type": "tool", "name": function["name"]}
    raise Untranslatable("tool_choice: must be auto, none, required or a named function")
