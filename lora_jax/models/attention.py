"""Masks, the KV cache and grouped-query dot-product attention shared by every model.

KV cache (`init_cache(cfg, batch, max_len, dtype)`), one pytree for scanned and unrolled models:

    {"k":     [L, B, S, n_kv, head_dim]  keys after RoPE, one slot per token written so far
     "v":     [L, B, S, n_kv, head_dim]
     "mask":  [B, S] bool                slot holds a real token (False: empty or padding)
     "index": int32 []                   next slot to write (same for the whole batch)}

A call with T new tokens and a cache writes their k/v at slots index..index+T-1, marks those slots
valid where `attention_mask` is 1, lets the query in slot index+t attend to every valid slot
<= index+t (and, for sliding-window layers, > index+t-window, counted in slots as transformers
does) and returns the cache with index += T. Shapes stay fixed, so one jitted function serves
prefill (T = prompt length) and another decoding (T = 1). Default positions continue from the
number of valid slots: position = valid_before + cumsum(attention_mask) - 1 (clipped at 0), so a
left-padded prompt gets positions 0.. on its real tokens and decoding continues from there.
Writing past S is not checked under jit (dynamic_update_slice clamps): size S >= prompt + new tokens.

Attention is computed with scores and softmax in float32 and masked with the dtype's most negative
value (not -inf), so fully-masked rows (padding queries) stay finite.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.models.config import ModelConfig

Cache = dict[str, jax.Array]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens (see the module docstring).

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> c = init_cache(cfg, batch=3, max_len=10)
    >>> c["k"].shape, c["mask"].shape, int(c["index"])
    ((2, 3, 10, 2, 4), (3, 10), 0)
    """
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def prepare(
    cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None, cache: Cache | None
) -> tuple[jax.Array, jax.Array, jax.Array | None, Cache | None]:
    """(positions [B, T], mask [B, 1, T, S], window mask or None, cache with the new mask/index).

    The masks are bool, True = may attend; S = T without a cache, the cache length with one.
    Without a cache, `attention_mask` may hold segment ids (packed rows: 1, 2, …, 0 = padding) and
    tokens attend only within their segment; pass the per-segment `positions` alongside.

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> pos, mask, _, _ = prepare(cfg, jnp.zeros((1, 3), jnp.int32), jnp.array([[0, 1, 1]]), None, None)
    >>> pos.tolist(), mask.shape
    ([[0, 0, 1]], (1, 1, 3, 3))
    >>> _, mask, _, _ = prepare(cfg, jnp.zeros((1, 3), jnp.int32), jnp.array([[1, 1, 2]]), None, None)
    >>> mask[0, 0, 2].tolist()  # the token of segment 2 sees only itself
    [False, False, True]
    """
    b, t = input_ids.shape
    am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        seen = jnp.zeros((b,), jnp.int32)
        index = jnp.zeros((), jnp.int32)
        valid = am
        new_cache = None
    else:
        index = cache["index"].astype(jnp.int32)
        seen = cache["mask"].sum(-1).astype(jnp.int32)
        valid = jax.lax.dynamic_update_slice(cache["mask"], am, (0, index))
        new_cache = dict(cache, mask=valid, index=index + t)
    if positions is None:
        positions = jnp.maximum(seen[:, None] + jnp.cumsum(am.astype(jnp.int32), axis=-1) - 1, 0)
    q_slot = index + jnp.arange(t)[:, None]  # [T, 1]
    k_slot = jnp.arange(valid.shape[1])[None, :]  # [1, S]
    mask = valid[:, None, None, :] & (k_slot <= q_slot)[None, None]
    if cache is None and attention_mask is not None:
        # Packed rows carry segment ids (1, 2, …; 0 = padding) in attention_mask: a token attends only
        # inside its own example. A 0/1 mask gives the same mask as before; padding queries (0) keep
        # attending to every valid key, as transformers' padded rows do.
        seg = attention_mask.astype(jnp.int32)
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
        mask = mask & same[:, None]
    window = None
    if cfg.sliding_window is not None:
        window = mask & (k_slot > q_slot - cfg.sliding_window)[None, None]
    return positions.astype(jnp.int32), mask, window, new_cache


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    kv: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Grouped-query attention of q [B, T, H, d] over k, v [B, T, n_kv, d] (or the cache).

    With `kv` (this layer's cache [B, S, n_kv, d] pair) the new k/v are written at `index` and the
    queries attend over all S slots; returns (out [B, T, H*d], updated kv or None).

    >>> q = jnp.ones((1, 2, 4, 8)); k = v = jnp.ones((1, 2, 2, 8))
    >>> out, _ = attend(q, k, v, jnp.ones((1, 1, 2, 2), bool), 8 ** -0.5)
    >>> out.shape
    (1, 2, 32)
    """
    if kv is not None:
        k_cache, v_cache = kv
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        kv = (k, v)
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)  # mask [B, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(probs.dtype))
    return out.reshape(b, t, h * d).astype(q.dtype), kv
