"""Every job ends exactly once: the reply / dead-letter table."""

from __future__ import annotations

import pytest

from schemas.errors import ErrorCode
from workers.routing import Disposition, disposition


@pytest.mark.parametrize(
    ("outcome", "has_reply_to", "expected"),
    [
        (None, True, Disposition(reply=True, dead_letter=False, code=None)),
        (
            ErrorCode.UPSTREAM_ERROR,
            True,
            Disposition(reply=True, dead_letter=True, code=ErrorCode.UPSTREAM_ERROR),
        ),
        (
            ErrorCode.INVALID_REQUEST,
            False,
            Disposition(reply=False, dead_letter=True, code=ErrorCode.INVALID_REQUEST),
        ),
        (None, False, Disposition(reply=False, dead_letter=True, code=ErrorCode.INVALID_REQUEST)),
    ],
)
def test_disposition_table(
    outcome: ErrorCode | None, has_reply_to: bool, expected: Disposition
) -> None:
    assert disposition(outcome, has_reply_to=has_reply_to) == expected


@pytest.mark.parametrize("code", list(ErrorCode))
@pytest.mark.parametrize("has_reply_to", [True, False])
def test_every_error_is_dead_lettered(code: ErrorCode, has_reply_to: bool) -> None:
    """Whatever the code, the job lands in the dead-letter queue with it."""
    result = disposition(code, has_reply_to=has_reply_to)
    assert result.dead_letter and result.code is code
    assert result.reply is has_reply_to


@pytest.mark.parametrize(
    ("outcome", "code"),
    [(None, ErrorCode.INTERNAL_ERROR), (ErrorCode.UPSTREAM_ERROR, ErrorCode.UPSTREAM_ERROR)],
)
def test_unroutable_reply_becomes_a_dead_letter(outcome: ErrorCode | None, code: ErrorCode) -> None:
    """The caller's queue is gone: keep the answer with a dead letter, never drop it."""
    assert disposition(outcome, has_reply_to=True, reply_unroutable=True) == Disposition(
        reply=False, dead_letter=True, code=code
    )
