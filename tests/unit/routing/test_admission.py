"""Intake rules: where replies may go, whom a job is billed to, what it may ask for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.routing.admission import Admission, ModelLimits


def rules(**kwargs: object) -> Admission:
    base: dict[str, object] = {
        "reply_queues": ("llmq.reply.*", "svc-*.replies", "exact-queue"),
        "own_queues": ("llmq.dead", "llmq.q.interactive", "llmq.q.batch"),
        "own_prefixes": ("llmq.q.", "llmq.state."),
    }
    return Admission(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("queue", "allowed"),
    [
        ("llmq.reply.0f3a", True),
        ("svc-billing.replies", True),
        ("exact-queue", True),
        ("exact-queue2", False),  # whole-name match, not a prefix
        ("other-service.jobs", False),
        ("llmq.q.interactive", False),
        ("llmq.dead", False),
        ("llmq.state.abc", False),
        ("amq.rabbitmq.reply-to", False),
        ("llmq.reply", False),
        ("svc-.replies", True),
    ],
)
def test_replies_go_only_to_reply_queues(queue: str, allowed: bool) -> None:
    assert rules().reply_allowed(queue) is allowed


def test_llmq_queues_are_refused_even_when_a_pattern_names_them() -> None:
    loose = rules(reply_queues=("llmq.*",))
    assert loose.reply_allowed("llmq.reply.x")
    assert not loose.reply_allowed("llmq.dead")
    assert not loose.reply_allowed("llmq.q.batch")
    assert not loose.reply_allowed("llmq.q.anything")
    assert not loose.reply_allowed("llmq.state.w1")


def test_no_patterns_allow_nothing() -> None:
    assert not rules(reply_queues=()).reply_allowed("llmq.reply.x")


@given(st.text(min_size=1, max_size=80))
def test_regex_characters_in_names_are_literal(name: str) -> None:
    """A queue name is matched as text: ``.`` or ``(`` in a pattern or a name means itself."""
    exact = rules(reply_queues=(name.replace("*", ""),))
    literal = name.replace("*", "")
    if literal and not literal.startswith(("amq.", "llmq.q.", "llmq.state.")):
        assert exact.reply_allowed(literal) is (literal not in ("llmq.dead",))
    assert not exact.reply_allowed(literal + "\x00")


def test_tenant_comes_from_the_broker_user_not_the_header() -> None:
    a = rules(users={"svc-a": "acme"}, default_tenant="anonymous")
    assert a.tenant("svc-a", None) == "acme"
    assert a.tenant("svc-a", "globex") == "acme"  # the claim is ignored
    assert a.tenant(None, "capped") == "anonymous"
    assert a.tenant("stranger", None) == "anonymous"
    assert rules().tenant(None, "capped") is None


def test_the_header_is_believed_only_from_trusted_users() -> None:
    a = rules(users={"gateway": "ops"}, trust_header_from=("gateway",))
    assert a.tenant("gateway", "acme") == "acme"
    assert a.tenant("gateway", None) == "ops"
    assert a.tenant("svc-b", "acme") is None
    anyone = rules(trust_header_from=("*",))
    assert anyone.tenant(None, "acme") == "acme"
    assert "trusted" in repr(anyone)


def test_limits_on_cost_multipliers() -> None:
    a = rules(limits={"m": ModelLimits(max_output_tokens=1000, max_n=2)})
    assert a.limit("m", 1000, 2) is None
    assert a.limit("m", None, 1) is None
    assert "max_tokens 1001" in (a.limit("m", 1001, 1) or "")
    assert "n 3" in (a.limit("m", 10, 3) or "")
    assert a.limit("unlisted", 10**6, 100) is None
    assert a.output_cap("m", None) == 1000
    assert a.output_cap("m", 5) == 5
    assert a.output_cap("unlisted", None) is None
    assert rules(limits={"m": ModelLimits()}).limit("m", 10**6, 8) is None
