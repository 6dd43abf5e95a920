"""The Azure OpenAI dialect (``kind = "azure"``): deployments, api-version, api-key.

``POST {resource}/openai/deployments/{deployment}/chat/completions?api-version=V``
(or ``/embeddings``), where the deployment is the endpoint's name for the model
(``models.X.upstream``) and ``V`` is ``api_version``. The key goes in an
``api-key`` header, or an Entra ID token in ``Authorization: Bearer``. The body
is OpenAI's; its ``model`` is kept (Azure ignores it: the deployment decides).

Answers are OpenAI's shape, plus Azure's content-filter annotations, passed
through. Errors are ``{"error": {"code", "message", ...}}``: a content-filter
refusal is a 400 with ``code: content_filter`` (the request is rejected, not
retried), a 429 carries ``retry-after`` / ``retry-after-ms`` (and says "retry
after N seconds" in its text, read when a proxy dropped the headers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.providers.base import Call, UpstreamReply
from workers.providers.openai import (
    endpoint_headers,
    endpoint_secrets,
    failure,
    read_reply,
    retry_after_in_text,
    with_query,
)
from workers.routing import FailureKind

__all__ = ["AzureAdapter"]

_PATHS = {JobKind.CHAT: "/chat/completions", JobKind.EMBEDDING: "/embeddings"}


class AzureAdapter:
    """One Azure OpenAI resource; each model a deployment of it."""

    def __init__(self, endpoint: EndpointSettings) -> None:
        assert endpoint.api_version is not None  # the settings require it for azure
        self.name = endpoint.name
        self.secrets = endpoint_secrets(endpoint)
        self.streams = True
        auth = {}
        if endpoint.api_key is not None:
            auth["api-key"] = endpoint.api_key.get_secret_value()
        elif endpoint.azure_ad_token is not None:
            auth["Authorization"] = f"Bearer {endpoint.azure_ad_token.get_secret_value()}"
        self._headers = endpoint_headers(endpoint, auth)
        self._root = f"{endpoint.base_url.removesuffix('/openai')}/openai/deployments/"
        self._query = {"api-version": endpoint.api_version, **endpoint.query}
        self._urls = {
            (entry.upstream, kind): self._url(entry.upstream, kind)
            for entry in endpoint.models.values()
            for kind in _PATHS
        }

    def __repr__(self) -> str:
        return f"AzureAdapter({self.name!r})"

    def _url(self, deployment: str, kind: JobKind) -> str:
        return with_query(f"{self._root}{quote(deployment, safe='')}{_PATHS[kind]}", self._query)

    def call(self, kind: JobKind, request: Mapping[str, Any], upstream_model: str) -> Call:
        url = self._urls.get((upstream_model, kind)) or self._url(upstream_model, kind)
        return Call(url, self._headers, orjson.dumps({**request, "model": upstream_model}))

    def answer(
        self, kind: JobKind, status: int, headers: Mapping[str, str], raw: bytes, *, now: float
    ) -> UpstreamReply:
        if status == 200:
            return read_reply(self.name, kind, raw)
        error = failure(self.name, self.secrets, status, headers, raw, now=now)
        if error.kind is FailureKind.RATE_LIMITED and error.retry_after_s is None:
            error.retry_after_s = retry_after_in_text(str(error))
        raise error
