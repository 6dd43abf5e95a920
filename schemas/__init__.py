"""The llmq wire contract: job and reply formats, error codes, settings, codec."""

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
