"""What a job can cost at most, before it runs: the amount a hard cap reserves.

A job's bill is ``prompt_tokens × input price + completion_tokens × output
price`` (per million tokens), and the worker learns the token counts only
from the upstream's answer. Before the call both are bounded: the prompt by
its size, the completion by the job's output cap times ``n``. The bound holds
only for text prompts under byte-level tokenizers; images, audio and
provider-side tool prompts are billed in tokens the body's size does not
bound.

Pure arithmetic; no I/O.
"""

from __future__ import annotations

__all__ = ["estimate_usd", "prompt_tokens_bound"]


def prompt_tokens_bound(body_bytes: int) -> int:
    """The most prompt tokens a request body of ``body_bytes`` can be billed for.

    A byte-level BPE tokenizer (GPT-2 and its descendants) emits at most one
    token per byte of text, JSON escaping only lengthens text, and the JSON
    around each message (``{"role":…,"content":…}``) is longer than the few
    tokens a chat template adds per message.
    """
    return max(0, body_bytes)


def estimate_usd(
    prompt_tokens: int,
    output_tokens_cap: int,
    price_in_per_mtok: float,
    price_out_per_mtok: float,
    n: int = 1,
) -> float:
    """The worst-case cost of a job: its whole prompt and ``n`` completions at the cap.

    The prompt is billed once however many completions are asked for (as
    OpenAI-compatible APIs do); each of the ``n`` completions may use all of
    ``output_tokens_cap``. Negative counts count as 0 and ``n`` as at least 1.
    """
    prompt = max(0, prompt_tokens)
    output = max(0, output_tokens_cap) * max(1, n)
    return (prompt * price_in_per_mtok + output * price_out_per_mtok) / 1e6
