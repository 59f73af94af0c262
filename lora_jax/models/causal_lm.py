"""`CausalLM`: the one causal-LM wrapper every family shares (decoder + LM head).

A family subclasses it with two class attributes: `decoder` (the flax module class of HF's inner
model, built with the same fields) and `decoder_name` (its HF attribute: 'model', 'transformer'),
plus `embed_name` (the decoder's token embedding, which a tied head reads). The call is

    logits, cache = model.apply({"params": p}, input_ids, attention_mask, positions, cache)
    h, cache = model.apply(..., return_hidden=True)   # final normed hidden states, no head

(`return_hidden` serves a loss that applies the head itself in chunks,
`lora_jax.training.loss.chunked_ce_sum`). The head is `lora_jax.models.blocks.head_logits`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.models.blocks import head_logits
from lora_jax.models.config import ModelConfig


class CausalLM(nn.Module):
    """Decoder + LM head (tied to the embedding when cfg.tie_word_embeddings)."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    scan_layers: bool = False
    remat: Any = None
    attention: str = "auto"  # implementation (lora_jax.models.attn_dispatch)

    decoder: ClassVar[type]
    decoder_name: ClassVar[str] = "model"
    embed_name: ClassVar[str] = "embed_tokens"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, return_hidden=False):
        decoder = self.decoder(self.cfg, self.dtype, self.param_dtype, self.lora, self.scan_layers, self.remat,
                               self.attention, name=self.decoder_name)
        h, cache = decoder(input_ids, attention_mask, positions, cache)
        if return_hidden:
            return h, cache
        tied = decoder.variables["params"][self.embed_name]["embedding"] if self.cfg.tie_word_embeddings else None
        return head_logits(self, h, tied), cache
