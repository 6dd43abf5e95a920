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

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import RETRIABLE, ErrorCode

__all__ = [
    "CONTENT_TYPE",
    "DEAD_HEADERS",
    "HEADERS",
    "JOB_ID_RE",
    "SCHEMA_VERSION",
    "ChatMessage",
    "ChatRequest",
    "Reply",
    "ReplyError",
    "Routing",
    "SlaClass",
]

SCHEMA_VERSION = 1
"""Major version of this contract. Jobs may carry it in ``schema-version``;
workers reject jobs with a higher major version they do not understand."""

CONTENT_TYPE = "application/json"

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")
"""Job ids and correlation ids: 1–128 printable characters, no spaces."""


class SlaClass(StrEnum):
    """The routing key of a job on ``llmq.jobs``; one work queue each."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


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


class DEAD_HEADERS:
    """Headers a worker adds to the copy of a failed job in ``llmq.dead``."""

    ERROR_CODE = "error-code"
    ERROR = "error"
    ATTEMPTS = "attempts"
    FAILED_AT = "failed-at"
    WORKER = "worker"
    SLA_CLASS = "sla-class"
    """The original routing key, so a replay goes back to the same queue."""


class ChatMessage(BaseModel):
    """One chat message. Only ``role`` is checked; content passes through."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1, max_length=64)
    content: Any = None


class ChatRequest(BaseModel):
    """An OpenAI chat-completions request body.

    Tolerant: fields this model does not name pass through to the upstream
    unchanged (OpenAI keeps adding them). Strict on what routing depends on.
    """

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: Literal[False] | None = None
    """Streaming does not fit a queue: the reply is one message."""

    def output_cap(self) -> int | None:
        """The most output tokens the caller allows, if it said."""
        return self.max_completion_tokens or self.max_tokens


class ReplyError(BaseModel):
    """Why a job failed."""

    code: ErrorCode
    message: str
    retriable: bool

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


class Reply(BaseModel):
    """The envelope a worker publishes to the job's ``reply_to`` queue."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    job_id: str | None
    status: Literal["ok", "error"]
    response: dict[str, Any] | None = None
    error: ReplyError | None = None
    routing: Routing = Field(default_factory=Routing)
