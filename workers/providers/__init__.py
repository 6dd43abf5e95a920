"""Provider adapters: one module per ``endpoints.N.kind`` (see base.py).

:func:`adapter_for` picks an endpoint's adapter (``registry.py``): ``openai``
(openai.py), ``azure`` (azure.py), ``anthropic`` (anthropic.py).
"""

from workers.providers.base import Adapter, Call, UpstreamReply
from workers.providers.registry import adapter_for

__all__ = ["Adapter", "Call", "UpstreamReply", "adapter_for"]
