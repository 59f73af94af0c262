"""The attention entry point of every model (`attend`), its mask description (`prepare`) and the
KV cache.

`attend(q, k, v, mask, scale, kv, index, softcap=None)` serves training, eval, generation prefill
and decoding for every model family: it writes the KV cache when given one, then runs the
implementation the model's `attention` option selects (`lora_jax.models.attn_dispatch`:
"auto" | "reference" | "xla" | "cudnn" | "splash"). `prepare` describes the mask (an
`AttentionMask`, `lora_jax.models.masks`) instead of building a dense [B, 1, T, S] one; each
implementation turns the description into what it needs.

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

Every implementation computes the softmax in float32. Outputs of padding queries are not defined
(the reference lets them attend to every valid key, fused kernels give zeros); nothing reads them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors import UserError
from lora_jax.models import attn_dispatch
from lora_jax.models.attn_cudnn import cudnn
from lora_jax.models.attn_reference import reference, xla
from lora_jax.models.attn_splash import splash
from lora_jax.models.config import ModelConfig
from lora_jax.models.masks import AttentionMask, build, for_layer

IMPLEMENTATIONS = {"reference": reference, "xla": xla, "cudnn": cudnn, "splash": splash}

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
    cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None,
    cache: Cache | None, attention: str = "auto",
) -> tuple[jax.Array, AttentionMask, AttentionMask | None, Cache | None]:
    """(positions [B, T], mask, windowed mask or None, cache with the new mask/index).

    The masks are `AttentionMask` descriptions (`lora_jax.models.masks.dense` gives the bool
    [B, 1, T, S] they stand for); S = T without a cache, the cache length with one. Without a
    cache, `attention_mask` may hold segment ids (packed rows: 1, 2, …, 0 = padding) and tokens
    attend only within their segment; pass the per-segment `positions` alongside. `attention`: the
    implementation option the masks carry to `attend`.

    >>> from lora_jax.models.config import ModelConfig
    >>> from lora_jax.models.masks import dense
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> pos, mask, _, _ = prepare(cfg, jnp.zeros((1, 3), jnp.int32), jnp.array([[0, 1, 1]]), None, None)
    >>> pos.tolist(), mask.kind
    ([[0, 0, 1]], 'segments')
    >>> _, mask, _, _ = prepare(cfg, jnp.zeros((1, 3), jnp.int32), jnp.array([[1, 1, 2]]), None, None)
    >>> dense(mask, 3)[0, 0, 2].tolist()  # the token of segment 2 sees only itself
    [False, False, True]
    """
    b, t = input_ids.shape
    am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        seen = jnp.zeros((b,), jnp.int32)
        index = valid = new_cache = None
    else:
        index = cache["index"].astype(jnp.int32)
        seen = cache["mask"].sum(-1).astype(jnp.int32)
        valid = jax.lax.dynamic_update_slice(cache["mask"], am, (0, index))
        new_cache = dict(cache, mask=valid, index=index + t)
    if positions is None:
        positions = jnp.maximum(seen[:, None] + jnp.cumsum(am.astype(jnp.int32), axis=-1) - 1, 0)
    mask, window = build(attention_mask, cache, valid, index, t, cfg.sliding_window, attention)
    return positions.astype(jnp.int32), mask, window, new_cache


def layer_mask(mask: AttentionMask, window: AttentionMask | None, sliding) -> AttentionMask:
    """The mask of one layer: `window` where `sliding` (a bool, or a bool array under nn.scan).

    >>> from lora_jax.models.masks import build
    >>> layer_mask(*build(None, None, None, None, 4, 2, "auto"), True).window
    2
    """
    return for_layer(mask, window, sliding)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask,
    scale: float,
    kv: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | None = None,
    *,
    softcap: float | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Grouped-query attention of q [B, T, H, d] over k, v [B, T, n_kv, d] (or the cache).

    With `kv` (this layer's cache [B, S, n_kv, d] pair) the new k/v are written at `index` and the
    queries attend over all S slots; returns (out [B, T, H*d], updated kv or None). `softcap`:
    logit soft-capping cap · tanh(logits / cap) (Gemma 2/3). The implementation is
    `mask.implementation` ("auto" picks per call; `lora_jax.models.attn_dispatch`).

    >>> q = jnp.ones((1, 2, 4, 8)); k = v = jnp.ones((1, 2, 2, 8))
    >>> out, _ = attend(q, k, v, AttentionMask(), 8 ** -0.5)
    >>> out.shape
    (1, 2, 32)
    """
    if kv is not None:
        k_cache, v_cache = kv
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        kv = (k, v)
    b, t, h, d = q.shape
    requested = mask.implementation
    call = attn_dispatch.describe(q, k, mask, softcap)
    candidates, passed = attn_dispatch.plan(requested, call)
    for impl in candidates:
        try:
            out = IMPLEMENTATIONS[impl](q, k, v, mask, scale, softcap)
        except NotImplementedError as e:  # jax refused the kernel while tracing
            if requested != "auto":
                raise UserError(f"attention={impl!r} cannot serve this call ({call.summary()}): {e}") from None
            passed[impl] = f"jax refused it: {e}"
            continue
        if requested == "auto":  # an explicit choice needs no explaining (nor param_shapes' 1-token trace)
            attn_dispatch.log_once(requested, call, impl, passed)
        return out.reshape(b, t, h * d).astype(q.dtype), kv
    raise AssertionError("unreachable: 'reference' serves every call")  # pragma: no cover
