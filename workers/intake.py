"""Intake: what a delivery is, decided before anything is spent on it.

:func:`admit` reads one delivery and returns either the :class:`Job` to
serve or the failure :class:`~workers.outcome.Outcome` that ends it. It does
no I/O: the clock is a parameter and the rules are the worker's
:class:`~workers.routing.admission.Admission`.

=============================================  ==============================
the delivery                                   outcome
=============================================  ==============================
properties the client could not decode         invalid_request, dead letter only
fails the codec (body, headers, deadline...)   its code; reply if reply_to allowed
no ``reply_to``                                invalid_request, dead letter only
``reply_to`` not a reply queue                 invalid_request, dead letter only
otherwise                                      the job, billed to its tenant
=============================================  ==============================
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace

from schemas.broker.frames import undecodable
from schemas.broker.ports import Incoming
from schemas.codec import Delivery, Job, Rejected, decode_job
from schemas.errors import ErrorCode
from schemas.settings import ModelSettings, Settings
from workers.outcome import Outcome, failure
from workers.routing.admission import Admission, ModelLimits

__all__ = ["Intake", "admission", "fingerprint"]


def admission(settings: Settings) -> Admission:
    """The worker's intake rules, from its settings."""
    topo = settings.topology
    tenancy = settings.tenancy
    return Admission(
        reply_queues=settings.worker.reply_queues,
        own_queues=(topo.dead_queue, *(topo.queue_name(c) for c in topo.classes)),
        own_prefixes=(topo.queue_prefix, f"{topo.state_exchange}."),
        users=tenancy.users,
        trust_header_from=tenancy.trust_header_from,
        default_tenant=tenancy.default,
        limits={
            name: ModelLimits(m.max_output_tokens, m.max_n, settings.model_kind(name))
            for name in settings.served_models()
            for m in [settings.models.get(name) or ModelSettings()]
        },
    )


class Intake:
    """The worker's intake rules, bound to its settings."""

    def __init__(
        self,
        admission: Admission,
        *,
        default_sla_ms: Mapping[str, int],
        max_body_bytes: int,
        max_sla_ms: int,
    ) -> None:
        self.admission = admission
        self._defaults = default_sla_ms
        self._max_body = max_body_bytes
        self._max_sla = max_sla_ms

    @classmethod
    def from_settings(cls, settings: Settings, rules: Admission) -> Intake:
        """The intake of a worker with ``settings``."""
        classes = settings.topology.classes
        return cls(
            rules,
            default_sla_ms={k: c.default_sla_ms for k, c in classes.items()},
            max_body_bytes=settings.worker.max_body_bytes,
            max_sla_ms=settings.worker.max_sla_ms,
        )

    def admit(self, message: Incoming, now_ms: int) -> Job | Outcome:
        unreadable = undecodable(message.headers)
        if unreadable is not None:
            # Its properties could not be decoded (schemas/broker/frames.py): no id
            # and no reply_to to trust, so it is only dead-lettered, raw bytes kept.
            reason = f"AMQP properties could not be decoded: {unreadable}"
            return failure(None, ErrorCode.INVALID_REQUEST, reason)
        ts = message.timestamp
        decoded = decode_job(
            Delivery(
                body=message.body,
                routing_key=message.routing_key or "",
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                headers=message.headers or {},
                timestamp_ms=int(ts.timestamp() * 1000) if ts is not None else None,
                user_id=message.user_id,
            ),
            now_ms=now_ms,
            default_sla_ms=self._defaults,
            max_body_bytes=self._max_body,
            max_sla_ms=self._max_sla,
        )
        if isinstance(decoded, Rejected):
            return failure(
                decoded.job_id,
                decoded.code,
                decoded.message,
                reply_to=self.reply_queue(decoded.reply_to),
            )
        job = decoded
        if job.reply_to is None:
            # Nobody could read the answer: don't pay an upstream for it.
            reason = "reply_to is missing: the result would have nowhere to go"
            return failure(job.job_id, ErrorCode.INVALID_REQUEST, reason)
        if not self.admission.reply_allowed(job.reply_to):
            # Replying there would write, on the producer's behalf, where it may not.
            reason = (
                f"reply_to {job.reply_to[:100]!r} is not a reply queue"
                " (worker.reply_queues lists the allowed names)"
            )
            return failure(job.job_id, ErrorCode.INVALID_REQUEST, reason)
        return replace(job, tenant=self.admission.tenant(job.user_id, job.tenant))

    def reply_queue(self, reply_to: str | None) -> str | None:
        """``reply_to`` if the worker may write there, else None."""
        return reply_to if reply_to and self.admission.reply_allowed(reply_to) else None


def fingerprint(body: bytes, job: Job) -> bytes:
    """What makes two deliveries under one job id the same request."""
    digest = hashlib.blake2b(body, digest_size=16)
    for part in (job.reply_to, job.user_id, job.tenant, job.model, job.sla_class):
        digest.update(b"\x00" + (part or "").encode("utf-8", "surrogatepass"))
    return digest.digest()
