"""cuDNN fused attention (GPU): our masks as cuDNN's arguments, never as a boolean mask.

A boolean mask would become an additive bias whose backward computes a full [B, H, T, S] bias
gradient (jax #34685), so each mask kind maps to what cuDNN computes natively:

    "causal"    jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn"),
                a sliding window as local_window_size=(window - 1, 0) (jax passes cuDNN
                sliding_window_length = window: keys (q - window, q]).
    "segments"  the packed layout of jax's cuDNN module (`jax._src.cudnn`, guarded import):
                mask_type=PADDING_CAUSAL with, per row, every maximal run of one nonzero
                segment id as one example:
                    q_seqlen = kv_seqlen   int32 [B, M]     run lengths, -1 for absent examples
                    q_offsets = kv_offsets int32 [B, M + 1] run starts, -1 after the last
                (the conventions of jax's own test_sdpa_packed_layout; [B, M] offsets or 0 for
                absent lengths give wrong outputs without an error, measured on an H100).
                Causal inside each example, nothing across examples or from padding. Left
                padding, right padding and packed rows are all runs; Hopper or newer.

Exactness contract of "segments": each nonzero id occupies one contiguous run of its row (true of
padding masks and of `train.data` packing). A row breaking it (an id split by another id or by
padding) cannot be expressed; its outputs become NaN instead of silently attending wrongly.
M is static: `FAST_SEGMENTS` slots cover the usual rows cheaply (cuDNN schedules B·M sequences,
most of them empty); a batch with a row of more runs takes the same kernel with M = T (exact,
slower) through `lax.cond`.

Padding queries (segment id 0) get zeros (the reference lets them attend; callers never read them),
which also keeps whatever the kernel leaves there out of the next layer.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from lora_jax.models.masks import AttentionMask

FAST_SEGMENTS = 64  # example slots per row on the fast path; cost of a slot: one empty cuDNN sequence

try:  # internal module: guarded, and its signature checked, before anything relies on it
    from jax._src.cudnn import fused_attention_stablehlo as _fa

    _PACKED_ARGS = {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type", "sliding_window_length"}
    PACKED_API = _PACKED_ARGS <= set(inspect.signature(_fa.dot_product_attention).parameters)
except Exception:  # noqa: BLE001 - absent or moved in this jax: the packed path is unavailable
    _fa = None
    PACKED_API = False


def cudnn_version() -> int | None:
    """cuDNN's version number (e.g. 90800) as jax sees it, None when absent (CPU/TPU wheels).

    >>> cudnn_version() is None or cudnn_version() > 0
    True
    """
    try:
        from jax._src.lib import cuda_versions

        return None if cuda_versions is None else int(cuda_versions.cudnn_get_version())
    except Exception:  # noqa: BLE001
        return None


def packed_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(seqlens int32 [B, M], offsets int32 [B, M + 1], ok bool [B]) of segment ids [B, T], M = max_segments.

    Every maximal run of one nonzero id is an example; absent examples are -1 in both arrays. `ok`
    is False for a row with more than M runs or an id in two runs (not expressible).

    >>> lens, offs, ok = packed_layout(jnp.array([[0, 1, 1, 2, 2, 2, 0], [1, 0, 1, 0, 0, 0, 0]]), 3)
    >>> lens.tolist(), offs.tolist(), ok.tolist()
    ([[2, 3, -1], [1, 1, -1]], [[1, 3, -1, -1], [0, 2, -1, -1]], [True, False])
    """
    seg = segment_ids.astype(jnp.int32)
    b, t = seg.shape
    m = max_segments
    real = seg != 0
    prev = jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1]
    starts = real & (seg != prev)  # prev of the first token is 0: a real first token starts a run
    run = jnp.cumsum(starts, axis=1) - 1  # run index of every real token
    n_runs = starts.sum(axis=1)
    rows = jnp.arange(b)[:, None]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    slot = jnp.where(starts & (run < m), run, m + 1)  # out of range: dropped
    offsets = jnp.full((b, m + 1), -1, jnp.int32).at[rows, slot].set(pos, mode="drop")
    seqlens = jnp.zeros((b, m), jnp.int32).at[rows, jnp.where(real, run, m)].add(1, mode="drop")
    seqlens = jnp.where(jnp.arange(m) < n_runs[:, None], seqlens, -1)
    ordered = jnp.sort(seg, axis=1)
    n_ids = ((ordered != 0) & (ordered != jnp.pad(ordered, ((0, 0), (1, 0)))[:, :-1])).sum(axis=1)
    ok = (n_runs == n_ids) & (n_runs <= m)
    return seqlens, offsets, ok


def _packed(q, k, v, segment_ids, scale, window, max_segments):
    lens, offs, ok = packed_layout(segment_ids, max_segments)
    out = _fa.dot_product_attention(q, k, v, q_seqlen=lens, kv_seqlen=lens, q_offsets=offs, kv_offsets=offs,
                                    scale=scale, mask_type=_fa.MaskType.PADDING_CAUSAL,
                                    sliding_window_length=window)
    return jnp.where(ok[:, None, None, None], out, jnp.nan).astype(q.dtype)


def _segments(q, k, v, mask, scale, window):
    t = q.shape[1]
    fast = min(FAST_SEGMENTS, t)
    if fast == t:
        out = _packed(q, k, v, mask.segment_ids, scale, window, t)
    else:
        starts = (mask.segment_ids != 0) & (mask.segment_ids != jnp.pad(mask.segment_ids, ((0, 0), (1, 0)))[:, :-1])
        many = jnp.any(starts.sum(axis=1) > fast)
        out = jax.lax.cond(many, lambda *a: _packed(*a, scale, window, t), lambda *a: _packed(*a, scale, window, fast),
                           q, k, v, mask.segment_ids)
    return jnp.where((mask.segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
          softcap: float | None = None) -> jax.Array:
    """cuDNN flash attention for a "causal" or "segments" mask (module docstring); bf16/fp16 only.

    Raises NotImplementedError for what it cannot serve exactly (the dispatcher checks first).

    >>> q = jnp.ones((1, 2, 4, 8)); k = v = jnp.ones((1, 2, 2, 8))
    >>> cudnn(q, k, v, AttentionMask(), 1.0, softcap=30.0)
    Traceback (most recent call last):
    ...
    NotImplementedError: cuDNN attention has no logit soft-capping
    """
    if softcap is not None:
        raise NotImplementedError("cuDNN attention has no logit soft-capping")
    if mask.kind == "cache":
        raise NotImplementedError("cuDNN attention is not used with a KV cache")
    k, v = k.astype(q.dtype), v.astype(q.dtype)

    def run(window):
        if mask.kind == "causal":
            local = None if window is None else (window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=local,
                                                implementation="cudnn")
        if not PACKED_API:
            raise NotImplementedError("this jax has no cuDNN packed-sequence attention (jax._src.cudnn)")
        if q.shape[1] < 2:  # M = 1 takes jax's unpacked branch, which leaves the offsets unscaled
            raise NotImplementedError("the packed layout needs at least 2 positions")
        return _segments(q, k, v, mask, scale, window)

    if mask.window is None:
        return run(None)
    if mask.sliding is None:
        return run(mask.window)
    return jax.lax.cond(mask.sliding, lambda: run(mask.window), lambda: run(None))
