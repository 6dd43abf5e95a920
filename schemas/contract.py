"""Names and models of the wire contract between producers and workers.

A job is an AMQP message on the topic exchange ``llmq.jobs`` whose routing key
is its SLA class. Its body is an OpenAI chat-completions request; its
properties and headers (no ``x-`` prefix: the broker owns those) carry the
job id, the reply address, the deadline and routing hints. Workers answer on
the default exchange with a :class:`Reply` and copy failed jobs to the dead
letter queue with the ``error-*`` headers. docs/protocol.md is the prose form.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.errors import RETRIABLE, ErrorCode

__all__ = [
    "CONTENT_TYPE",
    "DEAD_HEADERS",
    "HEADERS",
    "JOB_ID_RE",
    "SCHEMA_VERSION",
    "ChatMessage",
    "ChatRequest",
    "EmbeddingRequest",
    "JobKind",
    "Reply",
    "ReplyError",
    "Routing",
    "SlaClass",
]

SCHEMA_VERSION = 1
"""Major version of this contract. Jobs may carry it in ``schema-version``;
workers reject jobs with a higher major version they do not understand."""

CONTENT_TYPE = "application/json"

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}\Z")
"""Job ids and correlation ids: 1–128 characters, a letter or digit first, then
letters, digits and ``._:@/+=-``. ``\\Z``, not ``$``: Python's ``$`` also matches
before a trailing newline."""


class SlaClass(StrEnum):
    """The routing key of a job on ``llmq.jobs``; one work queue each."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


class JobKind(StrEnum):
    """What a job asks for: the ``kind`` header (absent means ``chat``)."""

    CHAT = "chat"
    """An OpenAI chat-completions request; the reply holds a ``chat.completion``."""
    EMBEDDING = "embedding"
    """An OpenAI embeddings request; the reply holds the embeddings ``list``."""


class HEADERS:
    """Job header names (AMQP headers table)."""

    MODEL = "model"
    SLA_MS = "sla-ms"
    DEADLINE_MS = "deadline-ms"
    PUBLISHED_MS = "published-ms"
    TENANT = "tenant"
    TRACEPARENT = "traceparent"
    REPLAY_COUNT = "replay-count"
    SCHEMA_VERSION = "schema-version"
    KIND = "kind"
    """:class:`JobKind`; absent means ``chat`` (jobs from before it existed)."""


class DEAD_HEADERS:
    """Headers a worker adds to the copy of a failed job in ``llmq.dead``."""

    ERROR_CODE = "error-code"
    ERROR = "error"
    ATTEMPTS = "attempts"
    FAILED_AT = "failed-at"
    WORKER = "worker"
    SLA_CLASS = "sla-class"
    """The original routing key, so a replay goes back to the same queue."""
    REPLY_ERROR = "reply-error"
    """Why the reply could not be delivered (its queue did not exist)."""
    REPLY = "reply"
    """The undelivered reply envelope (UTF-8 JSON), when it is small."""
    REPLY_OFFSET = "reply-offset"
    """The undelivered reply, when large: the body is the job's body followed by
    the reply envelope, which starts at this byte."""
    HEADERS_DROPPED = "headers-dropped"
    """How many of the job's own headers did not fit in the dead letter's budget."""


class ChatMessage(BaseModel):
    """One chat message. Only ``role`` is checked; content passes through."""

    model_config = ConfigDict(extra="allow", strict=True)

    role: str = Field(min_length=1, max_length=64)
    content: Any = None


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class ChatRequest(BaseModel):
    """An OpenAI chat-completions request body.

    Tolerant: fields this model does not name pass through to the upstream
    unchanged (OpenAI keeps adding them). Strict on what routing depends on:
    the body is forwarded as received, so the named fields must already have
    their JSON types (no ``"100"`` for ``max_tokens``, no ``0`` for ``stream``).
    """

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(default=None, min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool | None = None
    """``true`` asks for the answer as a stream of chunks (docs/protocol.md, "Streamed replies")."""
    stream_options: StreamOptions | None = None

    def output_cap(self) -> int | None:
        """The most output tokens the caller allows, if it said."""
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(BaseModel):
    """An OpenAI embeddings request body: ``input`` is a string, a list of
    strings, or token arrays. Unknown fields pass through, as for chat."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(default=None, min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=100_000)
    stream: Literal[False] | None = None
    """Embeddings do not stream; ``false`` passes, as OpenAI's API would take it."""

    @field_validator("stream", mode="before")
    @classmethod
    def _no_stream(cls, value: Any) -> Any:
        # Literal[False] alone accepts 0 (0 == False), which would be forwarded.
        if value is not None and value is not False:
            raise ValueError("embeddings do not stream: false or absent")
        return value

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: Any) -> Any:
        # OpenAI refuses an empty input (and an empty string in a list); so do we,
        # before an upstream is paid to say so.
        if value == "" or value == [] or (isinstance(value, list) and "" in value):
            raise ValueError("must not be empty")
        if isinstance(value, list) and len(value) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return value

    def input_chars(self) -> int:
        """The size of the input, in characters (a token array counts 4 a token)."""
        items = self.input if isinstance(self.input, list) else [self.input]
        total = 0
        for item in items:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, list):
                total += 4 * len(item)
            else:
                total += 4
        return total


class ReplyError(BaseModel):
    """Why a job failed.

    ``code`` is one of :class:`ErrorCode`, or a plain string for a code added
    by a newer worker (a minor contract change); ``retriable`` still applies.
    """

    code: ErrorCode | str
    message: str
    retriable: bool

    @field_validator("code", mode="before")
    @classmethod
    def _known_code(cls, value: object) -> object:
        # Smart-mode unions would keep a known code as a plain str.
        if isinstance(value, str) and value in ErrorCode._value2member_map_:
            return ErrorCode(value)
        return value

    @classmethod
    def of(cls, code: ErrorCode, message: str) -> ReplyError:
        return cls(code=code, message=message, retriable=RETRIABLE[code])


class Routing(BaseModel):
    """How the worker served the job: the explainable part of a reply."""

    model: str | None = None
    endpoint: str | None = None
    attempts: int = 0
    hedged: bool = False
    queue_ms: float | None = None
    upstream_ms: float | None = None
    total_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    via: str | None = None
    """``fallback`` or ``overflow`` when ``model`` is not the model the job asked for."""


class Reply(BaseModel):
    """The envelope a worker publishes to the job's ``reply_to`` queue."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    job_id: str | None
    status: Literal["ok", "error"]
    response: dict[str, Any] | None = None
    error: ReplyError | None = None
    routing: Routing = Field(default_factory=Routing)
