"""FailureKind: which kinds retry, count against health, mark an endpoint unusable."""

from __future__ import annotations

import pytest

from workers.routing import FailureKind

K = FailureKind


@pytest.mark.parametrize(
    ("kind", "retriable", "endpoint_failure", "marks_unusable"),
    [
        (K.REFUSED, True, True, False),
        (K.TIMEOUT, True, True, False),
        (K.SERVER_ERROR, True, True, False),
        (K.MALFORMED, True, True, False),
        (K.RATE_LIMITED, True, False, False),
        (K.AUTH, True, False, True),
        (K.NOT_FOUND, True, False, True),
        (K.BAD_REQUEST, False, False, False),
        (K.TOO_LARGE, False, False, False),
    ],
)
def test_kind_properties(
    kind: FailureKind, retriable: bool, endpoint_failure: bool, marks_unusable: bool
) -> None:
    assert (kind.retriable, kind.endpoint_failure, kind.marks_unusable) == (
        retriable,
        endpoint_failure,
        marks_unusable,
    )


def test_values_are_stable_strings() -> None:
    assert [k.value for k in K] == [
        "refused",
        "timeout",
        "server_error",
        "malformed",
        "rate_limited",
        "auth",
        "bad_request",
        "not_found",
        "too_large",
    ]
