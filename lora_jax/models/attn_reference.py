"""The exact attention paths: "reference" (our einsum, the numerics every parity test pins) and
"xla" (`jax.nn.dot_product_attention(implementation="xla")`).

Both take q [B, T, H, d], k/v [B, S, K, d] (grouped-query: H = K·G, K/V never repeated) and an
`AttentionMask`, and return [B, T, H, d] in q's dtype.

reference: scores and softmax in float32 (matmuls in the compute dtype with float32
accumulation), masked with float32's most negative value (not -inf), so a fully masked row stays
finite; probabilities cast back to the compute dtype before probs @ v. Optional logit soft-capping
(Gemma 2/3): scores = cap · tanh(scale · q·k / cap), before masking, as transformers does.

xla: jax's own XLA path, given the causal flag and the static window (`local_window_size=
(window - 1, 0)`: the query itself plus window - 1 keys before it) when the mask is plain causal,
the dense reference mask otherwise. It has no soft-capping; the dispatcher never sends it a call
with one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.models.masks import AttentionMask, dense


def reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
              softcap: float | None = None) -> jax.Array:
    """Grouped-query attention, the reference numerics (module docstring).

    >>> q = jnp.ones((1, 2, 4, 8)); k = v = jnp.ones((1, 2, 2, 8))
    >>> reference(q, k, v, AttentionMask(), 8 ** -0.5).shape
    (1, 2, 4, 8)
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    m = dense(mask, t, k.shape[1])
    scores = jnp.where(m[:, :, None], scores, jnp.finfo(jnp.float32).min)  # m [B, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(probs.dtype))
    return out.reshape(b, t, h, d).astype(q.dtype)


def xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, scale: float,
        softcap: float | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention(implementation="xla")` for our masks (module docstring).

    >>> q = jnp.ones((1, 2, 4, 8)); k = v = jnp.ones((1, 2, 2, 8))
    >>> xla(q, k, v, AttentionMask(), 8 ** -0.5).shape
    (1, 2, 4, 8)
    """
    if softcap is not None:
        raise NotImplementedError("jax.nn.dot_product_attention has no logit soft-capping")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if mask.kind == "causal" and mask.sliding is None:
        window = None if mask.window is None else (mask.window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                            implementation="xla")
    m = dense(mask, q.shape[1], k.shape[1])
    m = jnp.broadcast_to(m, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, implementation="xla")
