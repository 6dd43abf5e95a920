"""The llmq wire contract: job and reply formats, error codes, settings, codec.

The public names load on first use (PEP 562), so that importing one pure
module such as ``schemas.errors`` (which the routing core does) loads no
pydantic: the contract's models stay one attribute away, not one import.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from schemas.codec import Delivery, Job, Rejected, decode_job, decode_reply, encode_reply
    from schemas.contract import (
        CONTENT_TYPE,
        DEAD_HEADERS,
        HEADERS,
        SCHEMA_VERSION,
        ChatMessage,
        ChatRequest,
        Reply,
        ReplyError,
        Routing,
        SlaClass,
    )
    from schemas.errors import HTTP_STATUS, RETRIABLE, ErrorCode
    from schemas.settings import ConfigError, Settings, load_settings

__all__ = [
    "CONTENT_TYPE",
    "DEAD_HEADERS",
    "HEADERS",
    "HTTP_STATUS",
    "RETRIABLE",
    "SCHEMA_VERSION",
    "ChatMessage",
    "ChatRequest",
    "ConfigError",
    "Delivery",
    "ErrorCode",
    "Job",
    "Rejected",
    "Reply",
    "ReplyError",
    "Routing",
    "Settings",
    "SlaClass",
    "decode_job",
    "decode_reply",
    "encode_reply",
    "load_settings",
]

_HOME = {
    **dict.fromkeys(
        ("Delivery", "Job", "Rejected", "decode_job", "decode_reply", "encode_reply"), "codec"
    ),
    **dict.fromkeys(
        (
            "CONTENT_TYPE",
            "DEAD_HEADERS",
            "HEADERS",
            "SCHEMA_VERSION",
            "ChatMessage",
            "ChatRequest",
            "Reply",
            "ReplyError",
            "Routing",
            "SlaClass",
        ),
        "contract",
    ),
    **dict.fromkeys(("HTTP_STATUS", "RETRIABLE", "ErrorCode"), "errors"),
    **dict.fromkeys(("ConfigError", "Settings", "load_settings"), "settings"),
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"schemas.{home}"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
