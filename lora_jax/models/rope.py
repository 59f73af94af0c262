"""Rotary position embeddings exactly as transformers computes them (`modeling_rope_utils`).

Inverse frequencies are computed once in float32 numpy (a constant folded into the graph):

    default:  inv_freq[i] = 1 / theta ** (2i / head_dim)
    linear:   inv_freq / factor
    llama3:   Llama 3.1 smoothing between the low- and high-frequency bands (factor,
              low_freq_factor, high_freq_factor, original_max_position_embeddings)

`cos_sin(cfg, positions)` gives cos/sin [B, T, head_dim] (the half-frequency table repeated twice,
HF's `cat((freqs, freqs))`), computed in float32 and cast to the compute dtype, and `apply_rope`
rotates q or k [B, T, heads, head_dim] with HF's rotate_half convention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, with the config's rope scaling applied.

    `local=True`: those of sliding-window layers (Gemma 3's rope_local_theta / rope_local_scaling).

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 1, 2, 2, 8, rope_theta=10000.0)
    >>> inv_frequencies(cfg).shape
    (4,)
    """
    dim = cfg.head_dim
    theta, rope = cfg.rope_theta, cfg.rope
    if local and cfg.rope_local_theta is not None:
        theta, rope = cfg.rope_local_theta, dict(cfg.rope_local_scaling or (("rope_type", "default"),))
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = (inv / np.float32(rope["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = np.float32(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope.get("original_max_position_embeddings", cfg.max_position_embeddings))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def cos_sin(cfg: ModelConfig, positions: jax.Array, dtype, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] for integer positions [B, T] (`local`: sliding layers' rope).

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 1, 2, 2, 8)
    >>> cos, sin = cos_sin(cfg, jnp.zeros((1, 3), jnp.int32), jnp.float32)
    >>> cos.shape, float(cos[0, 0, 0]), float(sin[0, 0, 0])
    ((1, 3, 8), 1.0, 0.0)
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg, local))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, head_dim] by cos/sin [B, T, head_dim] (HF's apply_rotary_pos_emb).

    >>> x = jnp.ones((1, 2, 3, 4))
    >>> apply_rope(x, jnp.ones((1, 2, 4)), jnp.zeros((1, 2, 4))).shape
    (1, 2, 3, 4)
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
