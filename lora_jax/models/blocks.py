"""Blocks every decoder family shares: activations, RMSNorm, the gated MLP, GQA self-attention, and
the causal-LM head.

    RMSNorm(eps, plus_one=False)   HF's RMSNorm; plus_one=True is Gemma's: fp32 x̂ · (1 + w), then cast
    GatedMLP                       down(act(gate(x)) · up(x)): Llama/Qwen/Mistral/Gemma (`mlp`)
    Attention                      q/k/v/o projections, optional per-head q/k norm, RoPE, softcap,
                                   through `lora_jax.models.attention.attend` (`self_attn`)
    head_logits                    the LM head on final hidden states: tied embeddingᵀ or `lm_head`,
                                   then the final logit soft-cap (Gemma 2) when the config has one

Every projection is a `lora_jax.layers.Dense`, so LoRA leaves injected into the params are used.
Submodule names are Hugging Face's, so param paths are HF module names.

>>> from lora_jax.models.config import ModelConfig
>>> cfg = ModelConfig("llama", 32, 16, 32, 1, 4, 2, 4)
>>> p = GatedMLP(cfg).init(jax.random.key(0), jnp.ones((1, 2, 16)))["params"]
>>> sorted(p)
['down_proj', 'gate_proj', 'up_proj']
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
from lora_jax.models.rope import apply_rope
from lora_jax.models.stack import saved


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
    """HF's RMSNorm (leaf 'scale'). Llama: normalise in fp32, cast back, multiply by the scale.
    `plus_one` (Gemma): multiply the fp32 normalised x by (1 + scale) in fp32, then cast; the
    scale is initialised to zeros as in Gemma."""

    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + scale.astype(jnp.float32))).astype(dtype)
        return scale.astype(dtype) * xf.astype(dtype)


def rms_norm(cfg: ModelConfig, dtype: Any, param_dtype: Any, name: str) -> RMSNorm:
    """The family's RMSNorm for `cfg` (Gemma's (1 + w) form when cfg.norm_plus_one)."""
    return RMSNorm(cfg.norm_eps, dtype, param_dtype, plus_one=cfg.norm_plus_one, name=name)


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) (HF's LlamaMLP / GemmaMLP)."""

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


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (HF's `self_attn`): q/k/v/o projections, optional
    per-head q/k RMSNorm (Qwen3, Gemma 3), attention-logit soft-capping (Gemma 2)."""

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
            q = rms_norm(c, self.dtype, self.param_dtype, "q_norm")(q)
            k = rms_norm(c, self.dtype, self.param_dtype, "k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, kv = attention.attend(q, k, v, mask, c.scale, kv, index, softcap=c.attn_softcap)
        return dense(c.hidden_size, c.o_bias, "o_proj")(out), kv


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(x / cap) (identity for cap None), as transformers soft-caps Gemma's logits.

    >>> round(float(softcap(jnp.array(100.0), 30.0)), 3)
    29.924
    """
    return x if cap is None else jnp.tanh(x / cap) * cap


def head_logits(module: nn.Module, h: jax.Array, embedding: jax.Array | None) -> jax.Array:
    """Logits from final hidden states `h`, called inside a causal LM's compact method: the tied
    `embedding` [V, D] transposed, or the LoRA-aware `lm_head` Dense when `embedding` is None;
    then the config's final logit soft-cap."""
    c = module.cfg
    if embedding is not None:
        logits = jnp.dot(h, embedding.astype(h.dtype).T)
    else:
        logits = Dense(c.vocab_size, use_bias=False, dtype=module.dtype, param_dtype=module.param_dtype,
                       lora=module.lora, name="lm_head")(h)
    return softcap(logits, c.final_softcap)
