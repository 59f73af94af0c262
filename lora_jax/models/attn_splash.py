"""Pallas splash attention (TPU; Pallas interpret mode elsewhere, for tests) for our masks.

`jax.experimental.pallas.ops.tpu.splash_attention` (guarded import) in its multi-query form, one
kernel per KV head, so grouped-query attention never repeats K/V:

    q [B, T, H, d] -> [B, K, G, T, d] (scaled first: splash does not scale)   k, v -> [B, K, T, d]
    vmap over B and K of make_splash_mqa(MultiHeadMask([causal-or-local mask] * G))(q, k, v, ids)

- causal: `CausalMask`; a sliding window: `LocalMask(window_size=(window - 1, 0))` (the query and
  window - 1 keys before it, which is causal too).
- padding and packing: `SegmentIds(q=ids, kv=ids)` with our attention_mask values as ids. Splash
  lets a query see keys of the *same* id, which is the reference meaning for every real token,
  whatever the layout (no contiguity needed). Padding tokens (id 0) see only padding; their
  outputs are zeroed (callers never read them).
- logit soft-capping: splash's own `attn_logits_soft_cap` (cap · tanh(logits / cap)).
- T must be a multiple of 128 (the kernel's block size); no KV cache.

Under a mesh (`jax.set_mesh`, which the train/eval steps enter) the kernel is wrapped in
`jax.shard_map` over the batch ('data', 'fsdp') and head ('tensor') axes: a Pallas TPU kernel
cannot be partitioned by GSPMD.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lora_jax.models.masks import AttentionMask

BLOCK = 128  # splash's default block sizes; T must be a multiple

try:
    from jax.experimental.pallas.ops.tpu import splash_attention as _sa

    SPLASH_API = all(hasattr(_sa, n) for n in ("make_splash_mqa", "SegmentIds", "CausalMask", "LocalMask",
                                               "MultiHeadMask"))
except Exception:  # noqa: BLE001 - absent in this jax: splash is unavailable
    _sa = None
    SPLASH_API = False


def _kernel(t: int, groups: int, window: int | None, softcap: float | None, interpret: bool):
    # Built inside the caller's trace every time: the kernel holds its mask tables as jax arrays, and
    # a kernel cached across traces (jit, nn.scan, remat) would leak them as tracers.
    if window is None:
        head = _sa.CausalMask((t, t))
    else:
        head = _sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    return _sa.make_splash_mqa(_sa.MultiHeadMask([head] * groups), head_shards=1, q_seq_shards=1,
                               attn_logits_soft_cap=softcap, interpret=interpret)


def _local(q, k, v, seg, scale, window, softcap, interpret):
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    kern = _kernel(t, h // n_kv, window, softcap, interpret)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh = qh.reshape(b, t, n_kv, h // n_kv, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, d]
    kh, vh = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, d]

    def one(qg, kk, vv, ids):
        return kern(qg, kk, vv, segment_ids=None if ids is None else _sa.SegmentIds(ids, ids))

    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv, in_axes=(0, 0, 0, None if seg is None else 0))(qh, kh, vh, seg)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    if seg is not None:
        out = jnp.where((seg != 0)[:, :, None, None], out, 0)
    return out.astype(q.dtype)


def _mesh_specs(mesh, b: int, h: int, n_kv: int) -> tuple[P, P] | None:
    """(q/k/v spec, segment-ids spec) splitting batch and heads over the mesh axes that divide them."""
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    n_batch = 1
    for a in batch:
        n_batch *= mesh.shape[a]
    if b % n_batch:
        batch = ()
    heads = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
    if heads and (h % mesh.shape[heads] or n_kv % mesh.shape[heads]):
        heads = None
    batch_spec = batch or None
    return P(batch_spec, None, heads, None), P(batch_spec, None)


def splash(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
           softcap: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Splash attention for a "causal" or "segments" mask (module docstring); T % 128 == 0.

    `interpret` None: Pallas interpret mode unless running on a TPU.

    >>> q = jnp.ones((1, 128, 2, 8)); k = v = jnp.ones((1, 128, 1, 8))
    >>> splash(q, k, v, AttentionMask(), 0.125).shape  # interpret mode off TPU
    (1, 128, 2, 8)
    """
    if not SPLASH_API:
        raise NotImplementedError("this jax has no Pallas splash attention")
    if mask.kind == "cache":
        raise NotImplementedError("splash attention is not used with a KV cache")
    if q.shape[1] % BLOCK:
        raise NotImplementedError(f"splash attention needs a sequence length divisible by {BLOCK}, got {q.shape[1]}")
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    seg = mask.segment_ids

    def run(window):
        fn = functools.partial(_local, scale=scale, window=window, softcap=softcap, interpret=interpret)
        specs = _mesh_specs(jax.sharding.get_abstract_mesh(), q.shape[0], q.shape[2], k.shape[2])
        if specs is None:
            return fn(q, k, v, seg)
        qkv, ids = specs
        return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, P() if seg is None else ids), out_specs=qkv,
                             check_vma=False)(q, k, v, seg)

    if mask.window is None:
        return run(None)
    if mask.sliding is None:
        return run(mask.window)
    return jax.lax.cond(mask.sliding, lambda: run(mask.window), lambda: run(None))
