"""Trace context: W3C ``traceparent`` always; OpenTelemetry spans only when asked for.

Without OpenTelemetry the job's ``traceparent`` header goes, unchanged, to
the upstream HTTP call and onto the reply: the caller's trace continues
through llmq without llmq appearing in it.

With the optional ``opentelemetry-sdk`` and an OTLP exporter installed *and*
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``…_TRACES_ENDPOINT``) set, the worker
opens one span per job (``llmq.job``, kind consumer, child of the job's
``traceparent``); the upstream call and the reply then carry that span's
``traceparent``. The packages are not llmq dependencies: they are imported
by name at start-up, and anything missing means no spans (one info line).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import replace
from typing import Any, Protocol

from schemas.codec import Job
from workers.outcome import Outcome, Route

__all__ = ["NOOP_TRACER", "JobSpan", "Route", "Tracer", "make_tracer", "traced"]


log = logging.getLogger("llmq.worker")

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class JobSpan(Protocol):
    traceparent: str | None
    """The span's context, for the upstream call and the reply."""

    def end(
        self, *, code: str | None, model: str | None, endpoint: str | None, attempts: int
    ) -> None: ...


class Tracer(Protocol):
    enabled: bool

    def start(self, job: Job) -> JobSpan: ...

    def shutdown(self) -> None: ...


class _NoopTracer:
    enabled = False

    def start(self, job: Job) -> JobSpan:  # pragma: no cover - never called when disabled
        raise RuntimeError("tracing is disabled")

    def shutdown(self) -> None:
        pass


NOOP_TRACER: Tracer = _NoopTracer()


class _OtelSpan:
    def __init__(self, span: Any, traceparent: str | None, status: Any) -> None:
        self._span = span
        self._status = status
        self.traceparent = traceparent

    def end(
        self, *, code: str | None, model: str | None, endpoint: str | None, attempts: int
    ) -> None:
        span = self._span
        if model is not None:
            span.set_attribute("llmq.model", model)
        if endpoint is not None:
            span.set_attribute("llmq.endpoint", endpoint)
        span.set_attribute("llmq.attempts", attempts)
        if code is not None:
            span.set_attribute("llmq.error_code", code)
            span.set_status(self._status.Status(self._status.StatusCode.ERROR, code))
        span.end()


class _OtelTracer:  # pragma: no cover - needs the optional packages, absent in CI
    enabled = True

    def __init__(self, modules: dict[str, Any], service_name: str) -> None:
        trace, sdk, export, resources, exporter, tracecontext, status = (
            modules[k]
            for k in ("trace", "sdk", "export", "resources", "exporter", "tracecontext", "status")
        )
        self._trace = trace
        self._status = status
        self._propagator = tracecontext.TraceContextTextMapPropagator()
        name = os.environ.get("OTEL_SERVICE_NAME") or service_name
        self._provider = sdk.TracerProvider(
            resource=resources.Resource.create({"service.name": name})
        )
        self._provider.add_span_processor(export.BatchSpanProcessor(exporter.OTLPSpanExporter()))
        self._tracer = self._provider.get_tracer("llmq")

    def start(self, job: Job) -> JobSpan:
        parent = (
            self._propagator.extract({"traceparent": job.traceparent}) if job.traceparent else None
        )
        span = self._tracer.start_span(
            "llmq.job",
            context=parent,
            kind=self._trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.message.id": job.job_id,
                "llmq.sla_class": job.sla_class,
                **({"llmq.tenant": job.tenant} if job.tenant else {}),
            },
        )
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return _OtelSpan(span, carrier.get("traceparent"), self._status)

    def shutdown(self) -> None:
        self._provider.shutdown()


def make_tracer(service_name: str = "llmq-worker") -> Tracer:
    """OpenTelemetry spans if configured and installed, else the no-op tracer."""
    if not any(os.environ.get(v) for v in _ENDPOINT_VARS):
        return NOOP_TRACER
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    kind = "grpc" if protocol == "grpc" else "http"
    names = {
        "trace": "opentelemetry.trace",
        "status": "opentelemetry.trace.status",
        "tracecontext": "opentelemetry.trace.propagation.tracecontext",
        "sdk": "opentelemetry.sdk.trace",
        "export": "opentelemetry.sdk.trace.export",
        "resources": "opentelemetry.sdk.resources",
        "exporter": f"opentelemetry.exporter.otlp.proto.{kind}.trace_exporter",
    }
    try:
        modules = {k: importlib.import_module(v) for k, v in names.items()}
    except ImportError as exc:
        log.info(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but %s is not installed: no spans"
            " (pip install opentelemetry-sdk opentelemetry-exporter-otlp)",
            exc.name,
        )
        return NOOP_TRACER
    return _OtelTracer(modules, service_name)  # pragma: no cover - optional packages


def traced(tracer: Tracer, route: Route) -> Route:
    """``route`` inside one span per job, which the upstream call and reply carry on."""

    async def run(job: Job, now_ms: int) -> Outcome:
        span = tracer.start(job)
        outcome: Outcome | None = None
        try:
            outcome = await route(replace(job, traceparent=span.traceparent), now_ms)
            return outcome
        finally:
            if outcome is None:
                span.end(code="cancelled", model=None, endpoint=None, attempts=0)
            else:
                routing = outcome.routing
                span.end(
                    code=None if outcome.code is None else outcome.code.value,
                    model=None if routing is None else routing.model,
                    endpoint=None if routing is None else routing.endpoint,
                    attempts=outcome.attempts,
                )

    return run
