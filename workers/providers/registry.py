"""Which adapter speaks for an endpoint: one entry per ``endpoints.N.kind``."""

from __future__ import annotations

from schemas.settings import ConfigError, EndpointSettings
from workers.providers.azure import AzureAdapter
from workers.providers.base import Adapter
from workers.providers.openai import OpenAIAdapter

__all__ = ["adapter_for"]


def adapter_for(endpoint: EndpointSettings) -> Adapter:
    """The adapter of ``endpoint``'s kind, its URLs and headers built now (start-up).

    Raises :class:`ConfigError` for a kind this install cannot speak.
    """
    if endpoint.kind == "openai":
        return OpenAIAdapter(endpoint)
    if endpoint.kind == "azure":
        return AzureAdapter(endpoint)
    if endpoint.kind == "anthropic":
        # Imported only where an endpoint uses it: most installs never load it.
        from workers.providers.anthropic import AnthropicAdapter

        return AnthropicAdapter(endpoint)
    raise ConfigError(f"config error: endpoint {endpoint.name}: unknown kind {endpoint.kind!r}")
