"""Generation: `generate` (KV cache, compiled decode loop, greedy or sampled) and `chat`.

>>> from lora_jax.generation import generate, chat
"""

from lora_jax.generation.chat import chat, chat_input_ids
from lora_jax.generation.generate import generate
from lora_jax.generation.sampling import (
    SamplingParams,
    mark_seen,
    repetition_penalty,
    select_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "SamplingParams",
    "chat",
    "chat_input_ids",
    "generate",
    "mark_seen",
    "repetition_penalty",
    "select_next",
    "top_k_filter",
    "top_p_filter",
]
