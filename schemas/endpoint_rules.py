"""What an endpoint's URL, headers and query may be, per provider kind.

:class:`schemas.settings.EndpointSettings` calls these checks from its field
validators; each raises ``ValueError`` with one line that says what to write
instead, so a URL that cannot work with its kind fails at load time rather
than as a 404 on the first job. No value that may be secret (a query string
other than ``api-version``, a header value) is ever quoted in a message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "AUTH_HEADERS",
    "check_ad_token",
    "check_api_version",
    "check_base_url",
    "check_header_names",
    "check_header_values",
    "check_model_kinds",
    "check_query",
]

AUTH_HEADERS: Mapping[str, tuple[str, ...]] = {
    "openai": ("authorization",),
    "azure": ("api-key", "authorization"),
    "anthropic": ("x-api-key",),
}
"""Per kind, the headers llmq sets from the endpoint's key (lower case)."""

_TRANSPORT_HEADERS = ("content-type", "content-length", "transfer-encoding")
"""Set by llmq and the HTTP client: the body is JSON, its framing theirs."""
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
"""An HTTP header name (RFC 9110's token)."""
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Control characters other than tab: CR/LF would split a header in two."""


def check_base_url(url: str, kind: str | None) -> None:
    """No query or fragment for any kind; for azure, the resource root only."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    deployment = _deployment(path)
    if parts.query or parts.fragment:
        version = parse_qs(parts.query).get("api-version", [None])[0]
        if version is None and deployment is None:
            raise ValueError(
                "must not carry a query string or fragment; put query parameters in"
                ' query = { name = "value" }'
            )
        root = f"{parts.scheme}://{parts.netloc}"
        raise ValueError(
            "must not carry a query string (an Azure OpenAI deployment URL?); write"
            f' kind = "azure", base_url = "{root}"'
            + (f', api_version = "{version}"' if version else ", api_version = ...")
            + (f' and the deployment "{deployment}"' if deployment else " and each deployment")
            + " as models.<name>.upstream"
        )
    if deployment is not None:
        root = f"{parts.scheme}://{parts.netloc}"
        if kind == "azure":
            raise ValueError(
                f'for kind azure, the resource root ("{root}"), not a deployment URL: put'
                f' the deployment "{deployment}" in models.<name>.upstream'
            )
        if kind == "openai":
            raise ValueError(
                'is an Azure OpenAI deployment URL; write kind = "azure",'
                f' base_url = "{root}", api_version = ... and the deployment'
                f' "{deployment}" as models.<name>.upstream'
            )
    if kind == "azure" and path and not path.endswith("/openai"):
        raise ValueError(
            "for kind azure, the resource root (https://NAME.openai.azure.com),"
            " optionally ending in /openai: llmq adds /openai/deployments/<deployment>/..."
        )


def _deployment(path: str) -> str | None:
    """The deployment named in an Azure deployment URL's path, if it is one."""
    segments = path.split("/")
    if "deployments" not in segments:
        return None
    after = segments[segments.index("deployments") + 1 :]
    return after[0] if after and after[0] else ""


def check_api_version(value: str | None, kind: str | None) -> None:
    if kind == "azure" and value is None:
        raise ValueError(
            'kind azure needs the api-version to call, e.g. api_version = "2024-10-21"'
        )
    if kind == "openai" and value is not None:
        raise ValueError("is for kind azure; for another query parameter use query")


def check_ad_token(env: str | None, kind: str | None, api_key_env: str | None) -> None:
    if env is None:
        return
    if kind is not None and kind != "azure":
        raise ValueError(f"is for kind azure (Entra ID), not {kind}; use api_key_env")
    if api_key_env is not None:
        raise ValueError("set api_key_env (api-key) or azure_ad_token_env (Entra ID), not both")


def check_header_names(names: Iterable[str], kind: str | None) -> None:
    """Valid tokens, and none that llmq sets itself."""
    ours = AUTH_HEADERS.get(kind or "", ())
    for name in names:
        if not _TOKEN.match(name):
            raise ValueError(f"{name[:64]!r} is not a valid header name")
        lower = name.lower()
        if lower in _TRANSPORT_HEADERS:
            raise ValueError(f"{name!r} is set by llmq (the body is JSON)")
        if lower in ours:
            source = "azure_ad_token_env" if lower == "authorization" and kind == "azure" else ""
            raise ValueError(
                f"{name!r} carries the key of kind {kind}, set by llmq from api_key_env"
                + (f" or {source}" if source else "")
            )


def check_header_values(headers: Mapping[str, str]) -> None:
    """No CR/LF or other control characters (the value itself is not quoted)."""
    for name, value in headers.items():
        if _CONTROL.search(value):
            raise ValueError(f"{name}: the value must not hold CR, LF or control characters")


def check_query(query: Mapping[str, str], kind: str | None) -> None:
    for name, value in query.items():
        if not name or _CONTROL.search(name) or _CONTROL.search(value):
            raise ValueError(f"{name[:64]!r}: names must be non-empty, without control characters")
        if kind == "azure" and name.lower() == "api-version":
            raise ValueError("api-version goes in api_version")


def check_model_kinds(kinds: Mapping[str, str], kind: str | None) -> None:
    """``kinds``: model name → its kind (chat, embedding)."""
    if kind != "anthropic":
        return
    for model, model_kind in kinds.items():
        if model_kind == "embedding":
            raise ValueError(
                f"{model}: kind anthropic endpoints serve chat models only"
                " (Anthropic has no embeddings API)"
            )
