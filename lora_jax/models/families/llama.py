"""Llama family (Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3) in Flax linen.

One decoder covers the family through `ModelConfig` flags (q/k/v bias for Qwen2, per-head q/k
RMSNorm for Qwen3, sliding window for Mistral, GQA, rope scaling, tied embeddings). Submodules are
named as in transformers' `LlamaForCausalLM`, so param paths are HF module names:

    {'model': {'embed_tokens': {'embedding': [V, D]},
               'layers': {'0': {'input_layernorm': {'scale': [D]},
                                'self_attn': {'q_proj': {'kernel': [D, H*d], 'bias'?: [H*d]},
                                              'k_proj': {'kernel': [D, K*d], 'bias'?},
                                              'v_proj': {'kernel': [D, K*d], 'bias'?},
                                              'o_proj': {'kernel': [H*d, D], 'bias'?},
                                              'q_norm'?: {'scale': [d]}, 'k_norm'?: {'scale': [d]}},
                                'post_attention_layernorm': {'scale': [D]},
                                'mlp': {'gate_proj': {'kernel': [D, F]}, 'up_proj': {'kernel': [D, F]},
                                        'down_proj': {'kernel': [F, D]}}},
                          '1': ...},
               'norm': {'scale': [D]}},
     'lm_head': {'kernel': [D, V]}}          # absent with tied embeddings (logits = h @ embeddingᵀ)

With scan_layers=True, 'layers' holds the block's subtree directly with a leading [L] axis.
Call: `logits, cache = model.apply({"params": p}, input_ids, attention_mask, positions, cache)`
(see `lora_jax.models.attention` for masks, positions and the cache).

>>> FAMILY.model_types
('llama', 'mistral', 'qwen2', 'qwen3')
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lora_jax.config import LoraConfig
from lora_jax.models import attention
from lora_jax.models.blocks import Attention, GatedMLP, RMSNorm
from lora_jax.models.causal_lm import CausalLM
from lora_jax.models.config import ModelConfig, decoder_fields, read_rope
from lora_jax.models.families import Family
from lora_jax.models.rope import cos_sin
from lora_jax.models.stack import block_stack, run_blocks, saved

LlamaAttention = Attention  # HF's names for the shared blocks
LlamaMLP = GatedMLP


class LlamaDecoderLayer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    mlp_cls: Any = GatedMLP  # Qwen3-MoE swaps in its sparse MoE block

    @nn.compact
    def __call__(self, x, cos, sin, mask, window, index, sliding, kv):
        c, kw = self.cfg, dict(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        mask = attention.layer_mask(mask, window, sliding)
        h = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(x)
        h, kv = Attention(**kw, name="self_attn")(h, cos, sin, mask, index, kv)
        x = saved(x + h)
        h = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
        return x + self.mlp_cls(**kw, name="mlp")(h), kv


class LlamaModel(nn.Module):
    """The decoder (HF's `model`): embeddings, blocks, final norm. Returns hidden states and cache."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    scan_layers: bool = False
    remat: Any = None
    attention: str = "auto"  # implementation (lora_jax.models.attn_dispatch)
    block: Any = LlamaDecoderLayer

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        c = self.cfg
        positions, mask, window, new_cache = attention.prepare(c, input_ids, attention_mask, positions, cache,
                                                               self.attention)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="embed_tokens")
        x = embed(input_ids)
        cos, sin = cos_sin(c, positions, self.dtype)
        layers = block_stack(self.block, c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                             scan=self.scan_layers, remat=self.remat, name="layers")
        x, new_cache = run_blocks(layers, x, cos, sin, mask, window, cache, new_cache)
        return RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="norm")(x), new_cache


class LlamaForCausalLM(CausalLM):
    """Llama-family causal LM; see the module docstring for the param tree.

    >>> import jax
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.zeros((1, 3), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> logits, cache = model.apply({"params": params}, ids)
    >>> logits.shape, cache
    ((1, 3, 32), None)
    """

    decoder = LlamaModel


def config_from_hf(hf_config: Any) -> ModelConfig:
    """ModelConfig of a transformers Llama / Mistral / Qwen2 / Qwen3 config."""
    g = lambda name, default=None: getattr(hf_config, name, default)  # noqa: E731
    model_type = hf_config.model_type
    n_layers = hf_config.num_hidden_layers
    theta, scaling = read_rope(g)
    window = g("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        types = g("layer_types") or ["full_attention"] * n_layers
        sliding = tuple(t == "sliding_attention" for t in types)
        window = window if any(sliding) else None
    else:  # mistral: every layer slides when sliding_window is set
        sliding = (window is not None,) * n_layers
    attn_bias = bool(g("attention_bias", False))
    return ModelConfig(
        **decoder_fields(hf_config, tie_default=False, max_positions_default=2048),
        rope_theta=theta,
        rope_scaling=scaling,
        attention_bias=True if model_type == "qwen2" else attn_bias,
        o_bias=attn_bias if model_type in ("llama", "qwen3", "qwen3_moe") else False,
        mlp_bias=bool(g("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=int(window) if window is not None and any(sliding) else None,
        sliding_layers=sliding if window is not None and any(sliding) else (),
        hidden_act=g("hidden_act", "silu"),
    )


COLUMN = P("fsdp", "tensor")  # [in, out]: output features split by 'tensor'
ROW = P("tensor", "fsdp")  # [in, out]: input features split by 'tensor'

RULES = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", COLUMN),
    (r"(o_proj|down_proj)\.kernel$", ROW),
    (r"embed_tokens\.embedding$", P("tensor", "fsdp")),  # [vocab, d]
    (r"lm_head\.kernel$", P("fsdp", "tensor")),  # [d, vocab]
    (r"(norm|layernorm)\.(scale|bias)$", P()),
    (r"\.bias$", P()),
)

# GGUF (llama.cpp) names: block tensor -> HF module inside `model.layers.N`, top-level tensors, and
# `llama.<key>` metadata -> LlamaConfig field (transformers.integrations.ggml.GGUF_CONFIG_MAPPING).
GGUF = {
    "arch": "llama",
    "block": {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
    "top": {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"},
    "config": {
        "context_length": "max_position_embeddings",
        "block_count": "num_hidden_layers",
        "feed_forward_length": "intermediate_size",
        "embedding_length": "hidden_size",
        "rope.dimension_count": "head_dim",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "vocab_size": "vocab_size",
    },
}

FAMILY = Family(
    name="llama",
    causal_lm=LlamaForCausalLM,
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    config_from_hf=config_from_hf,
    layers=("model", "layers"),
    embedding=("model", "embed_tokens"),
    rules=RULES,
    ignored_suffixes=("rotary_emb.inv_freq",),
    gguf=GGUF,
)
