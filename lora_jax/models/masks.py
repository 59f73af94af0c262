"""`AttentionMask`: what a call may attend to, described instead of materialised.

The models used to build one dense bool [B, 1, T, S] mask up front. A fused kernel wants something
else (cuDNN: causal + per-example lengths and offsets; splash: segment ids and a static causal
mask), so the model now hands every layer a small description and each implementation turns it
into what it needs (`lora_jax.models.attention`). Three kinds, fixed at trace time:

    kind        built from                                   fields set
    "causal"    no attention_mask, no cache                  -
    "segments"  attention_mask [B, T], no cache:             segment_ids [B, T] (as given: 0 = padding,
                0/1 padding (left or right) or packed           1, 2, … = the example a token belongs to)
                segment ids 1, 2, …
    "cache"     a KV cache (generation prefill / decoding)   kv_valid [B, S] bool, q_start int32 []

plus an optional sliding `window` (static int: key k is visible from query q when q - k < window)
that applies to every layer (`sliding` None) or, when the per-layer flag is only known at run time
(scanned layers of a model mixing sliding and global layers), to the layers where the bool array
`sliding` is True. `implementation` (static) is the model's `attention` option.

`dense(mask, t)` is the reference meaning, the very mask the models built before:
    valid key & key slot <= query slot
    & (same segment id, or the query is padding: padding queries see every valid key, as
       transformers' padded rows do)                                         ["segments" only]
    & query slot - key slot < window                                          [sliding layers only]

The mask is a pytree (arrays are leaves, `window` and `implementation` static), so it passes
through `nn.scan`, `jax.jit` and `jax.checkpoint` like the dense mask did.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("causal", "segments", "cache")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["segment_ids", "kv_valid", "q_start", "sliding"],
                   meta_fields=["window", "implementation"])
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Structured attention mask (see the module docstring).

    >>> m = AttentionMask(segment_ids=jnp.array([[1, 1, 2]]))
    >>> m.kind, dense(m, 3)[0, 0].astype(int).tolist()
    ('segments', [[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    """

    segment_ids: Any = None  # [B, T] int: attention_mask as given (no cache)
    kv_valid: Any = None  # [B, S] bool: cache slot holds a real token
    q_start: Any = None  # int32 []: cache slot of the first query
    sliding: Any = None  # bool []: run-time per-layer flag for `window` (None: window applies as set)
    window: int | None = None
    implementation: str = "auto"

    @property
    def kind(self) -> str:
        if self.kv_valid is not None:
            return "cache"
        return "causal" if self.segment_ids is None else "segments"

    @property
    def static_window(self) -> int | None:
        """The window when it applies to this layer for certain (no run-time flag)."""
        return self.window if self.sliding is None else None


def build(attention_mask: jax.Array | None, cache: dict | None, valid: jax.Array | None, index: jax.Array | None,
          t: int, window: int | None, implementation: str) -> tuple[AttentionMask, AttentionMask | None]:
    """(mask, windowed mask or None) for a call with `t` queries; see `lora_jax.models.attention.prepare`.

    A window no shorter than the key length cuts nothing and is dropped (exactly the same mask).

    >>> m, w = build(None, None, None, None, 4, 2, "auto")
    >>> m.kind, w.window
    ('causal', 2)
    >>> build(None, None, None, None, 4, 4, "auto")[1] is None
    True
    """
    if cache is None:
        mask = AttentionMask(segment_ids=None if attention_mask is None else attention_mask.astype(jnp.int32),
                             implementation=implementation)
        kv_len = t
    else:
        mask = AttentionMask(kv_valid=valid, q_start=index, implementation=implementation)
        kv_len = valid.shape[1]
    if window is None or window >= kv_len:
        return mask, None
    return mask, dataclasses.replace(mask, window=int(window))


def for_layer(mask: AttentionMask, window: AttentionMask | None, sliding: Any) -> AttentionMask:
    """The mask of one layer: `window` where `sliding` (a Python bool, or a bool array under scan).

    >>> m, w = build(None, None, None, None, 4, 2, "auto")
    >>> for_layer(m, w, True).window, for_layer(m, w, False).window
    (2, None)
    >>> for_layer(m, w, jnp.array(True)).sliding is not None
    True
    """
    if window is None:
        return mask
    if isinstance(sliding, (bool, np.bool_)):  # unrolled layers: known while tracing
        return window if sliding else mask
    return dataclasses.replace(window, sliding=jnp.asarray(sliding, bool))


def dense(mask: AttentionMask, t: int, s: int | None = None) -> jax.Array:
    """The reference bool mask [B or 1, 1, t, S] (True = may attend); S = t without a cache.

    >>> dense(AttentionMask(), 2).astype(int).tolist()
    [[[[1, 0], [1, 1]]]]
    """
    if mask.kind == "cache":
        valid = mask.kv_valid
        q_slot = mask.q_start + jnp.arange(t)[:, None]
    else:
        s = t if s is None else s
        valid = jnp.ones((1, s), bool) if mask.segment_ids is None else mask.segment_ids.astype(bool)
        q_slot = jnp.arange(t)[:, None]
    k_slot = jnp.arange(valid.shape[1])[None, :]
    out = valid[:, None, None, :] & (k_slot <= q_slot)[None, None]
    if mask.kind == "segments":
        seg = mask.segment_ids
        same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
        out = out & same[:, None]
    if mask.window is not None:
        windowed = out & (k_slot > q_slot - mask.window)[None, None]
        out = windowed if mask.sliding is None else jnp.where(mask.sliding, windowed, out)
    return out


def query_valid(mask: AttentionMask, t: int) -> jax.Array | None:
    """[B, t] bool: queries that are real tokens (None: all of them). Fused kernels give padding
    queries zeros; the reference lets them attend (callers never read them).

    >>> query_valid(AttentionMask(segment_ids=jnp.array([[0, 1]])), 2).tolist()
    [[False, True]]
    """
    if mask.kind == "segments":
        return mask.segment_ids != 0
    return None
