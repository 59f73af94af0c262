"""An emulator of cuDNN fused attention's documented semantics, for CPU tests of what we pass it.

`emulated_dot_product_attention` stands in for `jax._src.cudnn.fused_attention_stablehlo.
dot_product_attention` (the function `jax.nn.dot_product_attention(implementation="cudnn")` and our
packed path call). It is written from the documentation, independently of lora_jax:

- padding (mask types PADDING*): query i of row b is real when i < q_seqlen[b], key j when
  j < kv_seqlen[b]; causal (CAUSAL, PADDING_CAUSAL): j <= i; `sliding_window_length` w: keys
  (i - w, i], i.e. j > i - w.
- packed layout (`q_offsets` given): q_seqlen/kv_seqlen [B, M] are example lengths and
  q_offsets/kv_offsets [B, M + 1] example starts (-1 for absent examples, jax's docstring). The
  arguments go through jax's own preprocessing (`_fix_seqlen_offsets`: flatten the batch, drop
  -1s, offsets in elements), then cuDNN's ragged meaning applies to the flat list of sequences:
  sequence s holds the flat tokens [offset_s, offset_s + length_s), causal and windowed relative
  to its start. A token in two sequences, or a sequence reaching into another row, is an error.
- a query with no visible key outputs zeros.

It refuses a boolean mask or bias (what jax #34685 warns against) and non-bf16/fp16 inputs, and
validates the arguments' shapes with jax's own `check_layout`. Outputs and gradients are those of
dense float32 attention over the emulated mask (grouped-query without repeating K/V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as fa

MaskType = fa.MaskType


def _padded_allowed(b, t, s, mask_type, q_seqlen, kv_seqlen, window):
    i = jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    allowed = jnp.ones((b, t, s), bool)
    if mask_type in (MaskType.PADDING, MaskType.PADDING_CAUSAL):
        allowed &= (i[None] < q_seqlen[:, None, None]) & (j[None] < kv_seqlen[:, None, None])
    if mask_type in (MaskType.CAUSAL, MaskType.PADDING_CAUSAL):
        allowed &= (j <= i)[None]
    if window is not None:
        allowed &= (j > i - window)[None]
    return allowed, jnp.array(False)


def _packed_allowed(query, key, mask_type, q_seqlen, kv_seqlen, q_offsets, kv_offsets, window):
    b, t, n, h = query.shape
    s = key.shape[1]
    m = q_seqlen.shape[1]
    if q_offsets.shape != (b, m + 1) or kv_offsets.shape != (b, m + 1) or kv_seqlen.shape != (b, m):
        raise AssertionError(f"packed layout wants lengths [B, M] and offsets [B, M + 1]; got {q_seqlen.shape}, "
                             f"{kv_seqlen.shape}, {q_offsets.shape}, {kv_offsets.shape}")
    lq, lk, oq, ok = fa._fix_seqlen_offsets(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key)
    lq, lk = lq.reshape(-1), lk.reshape(-1)  # [B*M] sequence lengths (absent: 0)
    oq, ok = oq.reshape(-1)[: b * m] // (n * h), ok.reshape(-1)[: b * m] // (n * h)  # first flat token of each
    pq = jnp.arange(b * t)[:, None]  # flat query tokens
    pk = jnp.arange(b * s)[:, None]
    in_q = (lq > 0) & (pq >= oq) & (pq < oq + lq)  # [B*T, B*M]
    in_k = (lk > 0) & (pk >= ok) & (pk < ok + lk)
    overlap = jnp.any(in_q.sum(1) > 1) | jnp.any(in_k.sum(1) > 1)
    rel_q = pq - oq  # [B*T, B*M] position inside each sequence
    rel_k = pk - ok
    pair = in_q[:, None, :] & in_k[None, :, :]  # [B*T, B*S, B*M]
    if mask_type == MaskType.PADDING_CAUSAL:
        pair &= rel_k[None, :, :] <= rel_q[:, None, :]
    if window is not None:
        pair &= rel_k[None, :, :] > rel_q[:, None, :] - window
    flat = pair.any(-1).reshape(b, t, b, s)
    same_row = jnp.eye(b, dtype=bool)[:, None, :, None]
    across = jnp.any(flat & ~same_row)
    allowed = jnp.einsum("btcs,bc->bts", flat.astype(jnp.int32), jnp.eye(b, dtype=jnp.int32)) > 0
    return allowed, overlap | across


def emulated_allowed(query, key, mask_type, q_seqlen=None, kv_seqlen=None, q_offsets=None, kv_offsets=None,
                     sliding_window_length=None):
    """(allowed bool [B, T, S], invalid bool []): what cuDNN lets each query see, per the docs."""
    b, t = query.shape[:2]
    s = key.shape[1]
    if q_offsets is not None:
        return _packed_allowed(query, key, mask_type, q_seqlen, kv_seqlen, q_offsets, kv_offsets,
                               sliding_window_length)
    return _padded_allowed(b, t, s, mask_type, q_seqlen, kv_seqlen, sliding_window_length)


def emulated_dot_product_attention(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None,
                                   q_offsets=None, kv_offsets=None, fp8_params=None, *, scale=1.0,
                                   mask_type=MaskType.NO_MASK, seed=42, dropout_rate=0.0, qkv_layout="BTNH",
                                   sliding_window_length=None, use_fp8=False, return_residual=False):
    if bias is not None or mask is not None:
        raise AssertionError("a bias or boolean mask reached cuDNN (its backward computes a full bias gradient)")
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise AssertionError(f"cuDNN takes bf16/fp16, got {query.dtype}")
    if dropout_rate or use_fp8 or return_residual or qkv_layout != "BTNH":
        raise AssertionError("unexpected cuDNN option")
    if fa.has_padding(mask_type) and (q_seqlen is None or kv_seqlen is None):
        raise ValueError("Require q_seqlen and kv_seqlen to generate padding mask")
    fa.check_layout(query, key, value, None, q_seqlen, kv_seqlen, q_offsets, kv_offsets, None, None,
                    fa.AttentionLayout.BTNH)
    allowed, invalid = emulated_allowed(query, key, mask_type, q_seqlen, kv_seqlen, q_offsets, kv_offsets,
                                        sliding_window_length)
    b, t, n, h = query.shape
    kv = key.shape[2]
    qg = query.astype(jnp.float32).reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, key.astype(jnp.float32)) * scale
    logits = jnp.where(allowed[:, None, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1) * jnp.any(allowed, -1)[:, None, None, :, None]
    out = jnp.einsum("bkgts,bskh->btkgh", probs, value.astype(jnp.float32)).reshape(b, t, n, h)
    return jnp.where(invalid, jnp.nan, out).astype(query.dtype)


def install(monkeypatch) -> None:
    """Route every cuDNN attention call (jax.nn's and our packed path's) to the emulator."""
    import jax._src.nn.functions as functions

    from lora_jax.models import attn_cudnn

    monkeypatch.setattr(functions, "cudnn_dot_product_attention", emulated_dot_product_attention)
    monkeypatch.setattr(attn_cudnn._fa, "dot_product_attention", emulated_dot_product_attention)
