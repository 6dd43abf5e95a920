"""``llmq submit --stream``: one chat job, its tokens printed as they arrive.

The text goes to stdout as it comes (flushed per chunk); how the answer
ended (finish reason, usage, endpoint) goes to stderr, so the text can be
piped. Exit status: 0 whole answer, 1 an error (its code and message on
stderr; after some text, ``stream_interrupted`` says the text is not whole).
"""

from __future__ import annotations

from typing import Any, TextIO

import orjson

from producers.client import LlmqClient
from producers.errors import JobFailed, LlmqError
from schemas.settings import Settings

__all__ = ["run_stream"]


async def run_stream(
    settings: Settings,
    job: dict[str, Any],
    *,
    sla_class: str,
    sla_ms: int | None,
    tenant: str | None,
    out: TextIO,
    err: TextIO,
    quiet: bool = False,
) -> int:
    """Stream ``job`` (a chat request body with ``model`` and ``messages``)."""
    body = {k: v for k, v in job.items() if k not in ("model", "messages", "stream")}
    default_sla = settings.topology.classes[sla_class].default_sla_ms
    try:
        async with LlmqClient(
            settings.broker.addresses,
            exchange=settings.topology.jobs_exchange,
            default_sla_ms=default_sla,
        ) as client:
            stream = client.stream(
                job["model"],
                job["messages"],
                sla_ms=sla_ms,
                sla_class=sla_class,
                tenant=tenant,
                **body,
            )
            async with stream:
                async for chunk in stream:
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if isinstance(text, str) and text:
                            out.write(text)
                            out.flush()
    except JobFailed as exc:
        out.write("\n")
        err.write(f"llmq: {exc.code.value}: {exc}\n")
        return 1
    except LlmqError as exc:
        out.write("\n")
        err.write(f"llmq: {exc}\n")
        return 1
    out.write("\n")
    if not quiet:
        end = {
            "job_id": stream.job_id,
            "finish_reason": stream.finish_reason,
            "usage": stream.usage,
            "endpoint": stream.routing.get("endpoint"),
            "model": stream.routing.get("model"),
        }
        err.write(orjson.dumps(end).decode() + "\n")
    return 0
