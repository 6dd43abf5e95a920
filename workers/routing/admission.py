"""What a decoded job may do before anything is spent on it: where its reply may
go, whom it is billed to, and whether it asks for more than its model allows.

Pure: built once from the settings, asked once per job. Each question has one
answer and no side effect, so the worker shell only carries the answer out.

=========================  ===================================================
question                   rule
=========================  ===================================================
``reply_allowed(name)``    ``name`` matches one of ``worker.reply_queues``
                           (``*`` = any characters) and is none of llmq's own
                           queues (work queues, dead letters, state) nor a
                           broker-reserved ``amq.*`` name
``tenant(user, claimed)``  ``user`` (the broker-checked ``user_id``) in
                           ``trust_header_from`` (or ``*`` there) and a
                           claim → the claim; ``user`` in ``users`` → its
                           tenant; else ``tenancy.default``
``limit(model, cap, n)``   a reason when ``cap`` (max_tokens) or ``n`` is
                           above the model's ``max_output_tokens`` / ``max_n``
=========================  ===================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Admission", "ModelLimits"]


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """The cost-multiplying fields one model allows."""

    max_output_tokens: int | None = None
    max_n: int = 8
    kind: str = "chat"
    """The jobs the model takes (``chat`` or ``embedding``): a job of the other
    kind would be sent to an API path that cannot answer it."""


def _pattern(globs: Iterable[str]) -> re.Pattern[str]:
    parts = [".*".join(re.escape(p) for p in glob.split("*")) for glob in globs]
    return re.compile("|".join(f"(?:{p})" for p in parts) if parts else "(?!)")


class Admission:
    """The intake rules of one worker."""

    __slots__ = ("_default", "_limits", "_own", "_replies", "_trust_any", "_trusted", "_users")

    def __init__(
        self,
        *,
        reply_queues: Iterable[str],
        own_queues: Iterable[str],
        own_prefixes: Iterable[str],
        users: Mapping[str, str] | None = None,
        trust_header_from: Iterable[str] = (),
        default_tenant: str | None = None,
        limits: Mapping[str, ModelLimits] | None = None,
    ) -> None:
        self._replies = _pattern(reply_queues)
        # Never a reply destination, whatever the patterns say: a reply there
        # would be a forged job, a forged dead letter or a forged state message.
        own = [re.escape(q) for q in own_queues] + [re.escape(p) + ".*" for p in own_prefixes]
        self._own = re.compile("|".join([*own, r"amq\..*"]))
        trusted = frozenset(trust_header_from)
        self._trust_any = "*" in trusted
        self._trusted = trusted - {"*"}
        self._users = dict(users or {})
        self._default = default_tenant
        self._limits = dict(limits or {})

    def __repr__(self) -> str:
        return (
            f"<Admission replies={self._replies.pattern!r} users={len(self._users)}"
            f" trusted={sorted(self._trusted) + ['*'] * self._trust_any}>"
        )

    def reply_allowed(self, queue: str) -> bool:
        """Whether the worker may publish a reply to ``queue``."""
        return self._replies.fullmatch(queue) is not None and self._own.fullmatch(queue) is None

    def tenant(self, user: str | None, claimed: str | None) -> str | None:
        """The tenant a job is billed to: see the module's table."""
        if claimed is not None and (
            self._trust_any or (user is not None and user in self._trusted)
        ):
            return claimed
        if user is not None and user in self._users:
            return self._users[user]
        return self._default

    def limit(self, model: str, output_cap: int | None, n: int, kind: str = "chat") -> str | None:
        """Why a job asks for more than ``model`` allows, or what ``model`` cannot do; None."""
        limits = self._limits.get(model)
        if limits is None:
            return None
        if kind != limits.kind:
            return (
                f"model {model!r} is a {limits.kind} model, the job is a {kind} job"
                f" (the job's kind header says which API it calls)"
            )
        top = limits.max_output_tokens
        if top is not None and output_cap is not None and output_cap > top:
            return f"max_tokens {output_cap} is above the limit of {top} for model {model!r}"
        if n > limits.max_n:
            return f"n {n} is above the limit of {limits.max_n} for model {model!r}"
        return None

    def output_cap(self, model: str, asked: int | None) -> int | None:
        """The output tokens a job may produce: its own cap, else the model's."""
        if asked is not None:
            return asked
        limits = self._limits.get(model)
        return None if limits is None else limits.max_output_tokens
