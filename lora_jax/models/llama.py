"""Llama-family causal LM (Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3) in Flax linen.

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
Every projection is a `lora_jax.layers.Dense`, so LoRA leaves injected into the params are used.
Call: `logits, cache = model.apply({"params": p}, input_ids, attention_mask, positions, cache)`
(see `lora_jax.models.attention` for masks, positions and the cache).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.layers import Dense
from lora_jax.models import attention
from lora_jax.models.config import ModelConfig
from lora_jax.models.rope import apply_rope, cos_sin
from lora_jax.models.stack import block_stack, saved


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """transformers' ACT2FN for the activations our configs allow.

    >>> float(activation("relu")(jnp.array(-1.0)))
    0.0
    """
    return {
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in float32, cast back, multiply by `scale` (leaf named 'scale')."""

    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(dtype) * xf.astype(dtype)


class LlamaAttention(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, index, kv):
        c = self.cfg
        dense = lambda n, bias, name: Dense(n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                            lora=self.lora, name=name)
        b, t, _ = x.shape
        # checkpoint_name: what remat="save_projections" keeps (lora_jax.models.stack).
        q = saved(dense(c.num_heads * c.head_dim, c.attention_bias, "q_proj")(x)).reshape(b, t, c.num_heads, c.head_dim)
        k = saved(dense(c.num_kv_heads * c.head_dim, c.attention_bias, "k_proj")(x)).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = saved(dense(c.num_kv_heads * c.head_dim, c.attention_bias, "v_proj")(x)).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, kv = attention.attend(q, k, v, mask, c.scale, kv, index)
        return dense(c.hidden_size, c.o_bias, "o_proj")(out), kv


class LlamaMLP(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dense = lambda n, name: Dense(n, use_bias=c.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                      lora=self.lora, name=name)
        gate, up = saved(dense(c.intermediate_size, "gate_proj")(x)), saved(dense(c.intermediate_size, "up_proj")(x))
        h = activation(c.hidden_act)(gate) * up
        return dense(c.hidden_size, "down_proj")(h)


class LlamaDecoderLayer(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, window, index, sliding, kv):
        c, kw = self.cfg, dict(cfg=self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
        mask = attention.layer_mask(mask, window, sliding)
        h = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(x)
        h, kv = LlamaAttention(**kw, name="self_attn")(h, cos, sin, mask, index, kv)
        x = saved(x + h)
        h = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(**kw, name="mlp")(h), kv


class LlamaModel(nn.Module):
    """The decoder (HF's `model`): embeddings, blocks, final norm. Returns hidden states and cache."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    scan_layers: bool = False
    remat: Any = None
    attention: str = "auto"  # implementation (lora_jax.models.attn_dispatch)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
        c = self.cfg
        positions, mask, window, new_cache = attention.prepare(c, input_ids, attention_mask, positions, cache,
                                                               self.attention)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="embed_tokens")
        x = embed(input_ids)
        cos, sin = cos_sin(c, positions, self.dtype)
        layers = block_stack(LlamaDecoderLayer, c, dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora,
                             scan=self.scan_layers, remat=self.remat, name="layers")
        kv = None if cache is None else (cache["k"], cache["v"])
        index = None if cache is None else cache["index"]
        x, kv = layers(x, cos, sin, mask, window, index, kv)
        x = RMSNorm(c.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        if new_cache is not None:
            new_cache = dict(new_cache, k=kv[0], v=kv[1])
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM; see the module docstring for the param tree.

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.zeros((1, 3), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> logits, cache = model.apply({"params": params}, ids)
    >>> logits.shape, cache
    ((1, 3, 32), None)
    """

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None
    scan_layers: bool = False
    remat: Any = None
    attention: str = "auto"  # implementation (lora_jax.models.attn_dispatch)

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, return_hidden=False):
        # return_hidden=True: (final normed hidden states [B, T, D], cache) instead of the logits, for a
        # loss that applies the head itself in chunks (lora_jax.training.loss.chunked_ce_sum).
        decoder = LlamaModel(self.cfg, self.dtype, self.param_dtype, self.lora, self.scan_layers, self.remat,
                             self.attention, name="model")
        h, cache = decoder(input_ids, attention_mask, positions, cache)
        if return_hidden:
            return h, cache
        if self.cfg.tie_word_embeddings:
            embedding = decoder.variables["params"]["embed_tokens"]["embedding"]
            logits = jnp.dot(h, embedding.astype(h.dtype).T)
        else:
            logits = Dense(self.cfg.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                           lora=self.lora, name="lm_head")(h)
        return logits, cache
