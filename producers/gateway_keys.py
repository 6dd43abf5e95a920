"""Who is calling the gateway: API keys to callers, and job ids scoped to them.

A caller is known by the key it sends, never by what its request says: the
key names its tenant (``[gateway.tenants]``), and the job ids the gateway
makes are scoped to the key, so that two keys never share a job id and so
never share a worker's cached answer.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from schemas.contract import JOB_ID_RE
from schemas.settings import GatewaySettings

__all__ = ["OPEN", "Caller", "KeyRing", "duplicate_keys", "scoped_job_id"]

_KEY_ID_HEX = 12
"""48 bits of a digest name a key in job ids and logs: enough to tell keys
apart, far too few to help guess one (keys are high-entropy secrets)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Whom a request comes from: a key's short id and the tenant it is billed to."""

    key_id: str
    tenant: str | None = None


OPEN = Caller("open")
"""The caller of a gateway without keys (``require_auth = false``)."""


class KeyRing:
    """The callers' API keys, looked up in constant time.

    Keys are kept as SHA-256 digests, so every comparison has the same length
    and a key's length does not leak either; every key is compared, without an
    early exit, so the time does not tell which one matched.
    """

    def __init__(
        self, keys: Iterable[str], tenants: Mapping[str, Iterable[str]] | None = None
    ) -> None:
        entries: list[tuple[str, str | None]] = [(k, None) for k in keys if k]
        for tenant, tenant_keys in (tenants or {}).items():
            entries.extend((k, tenant) for k in tenant_keys if k)
        self._entries = tuple((_digest(k), Caller(_key_id(k), t)) for k, t in entries)

    def __repr__(self) -> str:
        return f"<KeyRing keys={len(self._entries)}>"  # never the keys

    @classmethod
    def from_settings(cls, gateway: GatewaySettings) -> KeyRing:
        return cls(
            (k.get_secret_value() for k in gateway.api_keys),
            {t: [k.get_secret_value() for k in ks] for t, ks in gateway.tenant_keys.items()},
        )

    @property
    def empty(self) -> bool:
        return not self._entries

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller an ``Authorization: Bearer`` header names; None for no known key.

        An empty ring lets everyone in as :data:`OPEN`.
        """
        if not self._entries:
            return OPEN
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip())
        found = None
        for digest, caller in self._entries:
            if hmac.compare_digest(given, digest):
                found = caller
        return found

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header holds one of the keys (open when empty)."""
        return self.identify(authorization) is not None


def duplicate_keys(gateway: GatewaySettings) -> list[str]:
    """Where one key is configured twice (the places, never the key): it must name one caller."""
    seen: dict[bytes, str] = {}
    clashes = []
    places = [("gateway.api_keys_env", k) for k in gateway.api_keys] + [
        (f"gateway.tenants.{t}", k) for t, ks in gateway.tenant_keys.items() for k in ks
    ]
    for place, key in places:
        digest = _digest(key.get_secret_value())
        if digest in seen and seen[digest] != place:
            clashes.append(f"{seen[digest]} and {place}")
        seen.setdefault(digest, place)
    return clashes


def scoped_job_id(caller: Caller, request_id: str) -> str:
    """The job id of ``request_id`` sent by ``caller``: the same for a retry, never another's.

    ``gw-<key id>-<request id>`` when it fits the job-id grammar's 128
    characters, else ``gw-<key id>=<digest of the request id>``: the character
    after the key id tells the two forms apart, so they never collide.
    """
    job_id = f"gw-{caller.key_id}-{request_id}"
    if len(job_id) <= 128:
        return job_id
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogateescape")).hexdigest()
    scoped = f"gw-{caller.key_id}={digest}"
    assert JOB_ID_RE.fullmatch(scoped) is not None
    return scoped


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _key_id(key: str) -> str:
    # Domain-separated from _digest, so an id reveals nothing of the stored digest.
    named = hashlib.sha256(b"llmq-gateway-key-id\0" + key.encode("utf-8", "surrogateescape"))
    return named.hexdigest()[:_KEY_ID_HEX]
