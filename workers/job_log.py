"""Log lines for finished jobs and spend alerts: a :class:`~workers.events.Hook`."""

from __future__ import annotations

import logging

from schemas.errors import ErrorCode
from workers.events import Event, JobDone, SpendAlert

__all__ = ["LogHook"]


# Codes a caller causes (a bad job, a spent budget): info. The rest say
# something about the fleet or the worker: warning.
_CALLER_CODES = frozenset(
    {
        ErrorCode.INVALID_REQUEST,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.OVER_BUDGET,
    }
)


class LogHook:
    """Log lines for finished jobs and budget alerts, with structured ``extra`` fields.

    An ok job is a debug line (at 1 000 jobs/s an info line each would be the
    loudest thing in the cluster); an error is info when the caller caused it
    and warning otherwise. Every line carries ``job_id``, ``model``,
    ``endpoint``, ``attempts`` and ``code``, which the JSON formatter turns
    into keys.
    """

    __slots__ = ("_log",)

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def __call__(self, event: Event) -> None:
        if isinstance(event, JobDone):
            self._job(event)
        elif isinstance(event, SpendAlert):
            self._log.warning(
                "budget %s %s: %d%% of %.2f USD spent this month (%.2f USD)",
                event.scope,
                event.name,
                round(event.threshold * 100),
                event.limit_usd,
                event.spent_usd,
                extra={
                    "scope": event.scope,
                    "budget": event.name,
                    "threshold": event.threshold,
                    "spent_usd": round(event.spent_usd, 6),
                    "limit_usd": event.limit_usd,
                    "month": event.month,
                },
            )

    def _job(self, event: JobDone) -> None:
        code = event.code
        if code is None:
            level = logging.DEBUG
        elif code in _CALLER_CODES:
            level = logging.INFO
        else:
            level = logging.WARNING
        if not self._log.isEnabledFor(level):
            return
        self._log.log(
            level,
            "job %s %s%s",
            event.job_id,
            "ok" if code is None else code.value,
            " (dead-lettered)" if event.dead_lettered else "",
            extra={
                "job_id": event.job_id,
                "model": event.model,
                "endpoint": event.endpoint,
                "attempts": event.attempts,
                "code": None if code is None else code.value,
                "tenant": event.tenant,
                "dead_lettered": event.dead_lettered,
            },
        )
