"""``stream: true`` through the gateway: a :class:`~producers.stream.ChatStream` relayed as SSE.

The status line waits for the first chunk, so everything that fails before
it (an unknown model, a full queue, a deadline) is an HTTP status with the
usual JSON error body, exactly as for an unstreamed request. After it, an
error is an SSE error event and the stream ends without ``[DONE]``
(:mod:`producers.gateway_events`).

A caller that hangs up cancels the request: the stream is closed, which
deletes its queue, and the worker drops the upstream call at its next part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from producers.client import LlmqClient
from producers.errors import LlmqError
from producers.gateway_core import Answer, JobOptions, answer_for_error, error_answer
from producers.gateway_events import DONE, StreamCall, error_event, event, stream_headers
from producers.gateway_server import on_hangup
from schemas.errors import ErrorCode

__all__ = ["stream_completion"]

log = logging.getLogger("llmq.gateway")


async def stream_completion(
    request: web.Request,
    client: LlmqClient,
    call: StreamCall,
    *,
    job_id: str,
    request_id: str,
    options: JobOptions,
    sla_class: str,
) -> web.StreamResponse:
    """Answer one streamed chat completion; raises ConnectionResetError if the caller left."""
    task = asyncio.current_task()
    assert task is not None
    left = False

    def hung_up() -> None:
        nonlocal left
        left = True
        task.cancel()

    undo = on_hangup(request, hung_up)
    try:
        return await _relay(
            request,
            client,
            call,
            job_id=job_id,
            request_id=request_id,
            options=options,
            sla_class=sla_class,
        )
    except asyncio.CancelledError:
        if not left:
            raise  # shutdown, not the caller
        task.uncancel()
        # As a write to the closed connection would have: the middlewares count a 499.
        raise ConnectionResetError("the caller went away mid-stream") from None
    finally:
        undo()


async def _relay(
    request: web.Request,
    client: LlmqClient,
    call: StreamCall,
    *,
    job_id: str,
    request_id: str,
    options: JobOptions,
    sla_class: str,
) -> web.StreamResponse:
    stream = client.stream(
        call.model,
        call.messages,
        sla_ms=options.sla_ms,
        sla_class=sla_class,
        tenant=options.tenant,
        job_id=job_id,
        traceparent=options.traceparent,
        **call.params,
    )
    try:
        # A message's chunks at a time: one write (one syscall) per part, not per token.
        parts = aiter(stream.parts())
        try:
            first = await anext(parts, None)
        except LlmqError as exc:  # nothing sent yet: a status, as for any request
            return _json(answer_for_error(exc, job_id, request_id=request_id))
        response = web.StreamResponse(headers=stream_headers(job_id, request_id))
        await response.prepare(request)
        if first is not None:
            await response.write(b"".join(map(event, first)))
            failure = await _rest(response, parts, job_id, request_id)
            if failure is not None:
                await response.write(failure)
                await response.write_eof()
                return response
        await response.write(DONE)
        await response.write_eof()
        return response
    finally:
        # Shielded: a second cancellation must not leave the queue (and the upstream call) alive.
        await asyncio.shield(stream.aclose())


async def _rest(
    response: web.StreamResponse,
    parts: AsyncIterator[list[dict[str, Any]]],
    job_id: str,
    request_id: str,
) -> bytes | None:
    """Relay the parts after the first; the error event to end with, or None at a clean end."""
    while True:
        try:
            chunks = await anext(parts)
        except StopAsyncIteration:
            return None
        except LlmqError as exc:
            return error_event(answer_for_error(exc, job_id, request_id=request_id))
        except Exception:
            log.exception("gateway: unexpected error mid-stream (job %s)", job_id)
            return error_event(
                error_answer(500, ErrorCode.INTERNAL_ERROR.value, "internal error", retriable=False)
            )
        # Raises ConnectionResetError once the caller left.
        await response.write(b"".join(map(event, chunks)))


def _json(answer: Answer) -> web.Response:
    return web.Response(
        body=orjson.dumps(answer.body),
        status=answer.status,
        headers=answer.headers,
        content_type="application/json",
    )
