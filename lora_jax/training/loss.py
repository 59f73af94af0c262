"""Masked next-token cross-entropy, as (sum, count) so accumulated batches average exactly.

Two batch conventions, both [B, T]:

- `targets` + `loss_mask` (what `train.data` produces): the logit at t predicts `targets[t]`,
  counted where `loss_mask[t]` is nonzero. No shifting.
- `labels` (Hugging Face style, aligned with `input_ids`, -100 = ignore): the logit at t predicts
  `labels[t + 1]`; shifted here. An optional `loss_mask` [B, T] aligned with labels multiplies in.

Without either, the labels are the `input_ids` themselves (plain language modelling).

Returning the *sum* of token losses and the *number* of counted tokens lets the train step add
micro-batches up and divide once: the mean over response tokens of the whole accumulated batch,
identical to one big batch (a mean of per-micro-batch means would weight short batches wrongly).
The softmax is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def targets_and_mask(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], float mask [B, T]) aligned with the logits, from either batch convention.

    >>> t, m = targets_and_mask({"input_ids": jnp.array([[5, 6, 7]]), "labels": jnp.array([[5, -100, 7]])})
    >>> t.tolist(), m.tolist()
    ([[0, 7, 0]], [[0.0, 1.0, 0.0]])
    """
    if "targets" in batch:
        targets = batch["targets"]
        mask = batch["loss_mask"] if "loss_mask" in batch else jnp.ones(targets.shape)
        return targets.astype(jnp.int32), mask.astype(jnp.float32)
    labels = batch["labels"] if "labels" in batch else batch["input_ids"]
    mask = (labels != IGNORE_INDEX).astype(jnp.float32)
    if "loss_mask" in batch:
        mask = mask * batch["loss_mask"].astype(jnp.float32)
    # logit t predicts label t+1; the last position predicts nothing.
    targets = jnp.concatenate([labels[:, 1:], jnp.zeros_like(labels[:, :1])], axis=1)
    mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    targets = jnp.where(mask > 0, targets, 0)
    return targets.astype(jnp.int32), mask


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, float32 [B, T].

    >>> float(token_losses(jnp.zeros((1, 1, 4)), jnp.array([[2]]))[0, 0])  # log(4)
    1.3862943649291992
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def masked_ce_sum(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of masked token losses, number of counted tokens), both float32 scalars.

    >>> s, n = masked_ce_sum(jnp.zeros((1, 3, 4)), {"input_ids": jnp.array([[1, 2, 3]])})
    >>> round(float(s / n), 4), float(n)
    (1.3863, 2.0)
    """
    targets, mask = targets_and_mask(batch)
    return (token_losses(logits, targets) * mask).sum(), mask.sum()


def masked_ce(logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean masked next-token cross-entropy over the counted tokens (0 if none).

    >>> round(float(masked_ce(jnp.zeros((1, 3, 4)), {"input_ids": jnp.array([[1, 2, 3]])})), 4)
    1.3863
    """
    s, n = masked_ce_sum(logits, batch)
    return s / jnp.maximum(n, 1.0)


# -- the LM head fused with the loss, over token chunks ---------------------------------------------
# The [tokens, vocab] float32 logits (and, in the backward pass, their gradient) are the largest
# activation of a small model's step: 512 tokens x 49152 vocab = 100 MB each for SmolLM2. Here the
# head matmul, the softmax and its gradient run one chunk of tokens at a time inside a `lax.scan`,
# so at most one chunk's logits exist. The gradient is computed in the same pass (softmax - onehot
# is known as soon as the logits are): the forward keeps only dL/dhidden [tokens, D] (and dL/dW
# when W is differentiated), so nothing is recomputed — the FLOPs equal the unchunked head's.


def _head_logits(h, w, vocab_first):
    # Same arithmetic as the models' heads: matmul in h's dtype, softmax in float32.
    return jnp.einsum("nd,vd->nv" if vocab_first else "nd,dv->nv", h, w.astype(h.dtype)).astype(jnp.float32)


def _head_ce_scan(h, w, targets, mask, vocab_first, want_dh, want_dw):
    """Loss sum over the chunks h [n, B, c, D] (targets/mask [n, B, c]); with want_dh/want_dw also
    dsum/dh (h's shape) and dsum/dw (w's shape)."""

    def body(dw, xs):
        hb, tc, mc = xs  # one chunk: c tokens of every row, so a batch-sharded B stays sharded
        hc, tc, mc = hb.reshape(-1, hb.shape[-1]), tc.reshape(-1), mc.reshape(-1)
        logits = _head_logits(hc, w, vocab_first)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        s = ((lse - picked) * mc).sum()
        if not (want_dh or want_dw):
            return dw, (s, None)
        # d(sum of masked token losses)/dlogits = (softmax - onehot) * mask. The onehot part is applied
        # as a row gather / scatter of w (no [chunk, V] onehot): dh = g W' - m * W'[t] with g = softmax * m.
        g = (jnp.exp(logits - lse[:, None]) * mc[:, None]).astype(hc.dtype)
        dh = None
        if want_dh:
            w_rows = jnp.take(w, tc, axis=0) if vocab_first else jnp.take(w, tc, axis=1).T  # [chunk, D]
            dh = jnp.einsum("nv,vd->nd" if vocab_first else "nv,dv->nd", g, w.astype(g.dtype))
            dh = (dh - (mc[:, None] * w_rows).astype(dh.dtype)).reshape(hb.shape)
        if want_dw:
            dw = dw + jnp.einsum("nv,nd->vd" if vocab_first else "nv,nd->dv", g, hc,
                                 preferred_element_type=jnp.float32)
            picked_h = (mc[:, None] * hc).astype(jnp.float32)  # onehotᵀ h: rows of h added at the targets
            dw = dw.at[tc].add(-picked_h) if vocab_first else dw.at[:, tc].add(-picked_h.T)
        return dw, (s, dh)

    dw0 = jnp.zeros(w.shape, jnp.float32) if want_dw else None
    dw, (s, dh) = jax.lax.scan(body, dw0, (h, targets, mask))
    return s.sum(), dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_ce(h, w, targets, mask, vocab_first):
    return _head_ce_scan(h, w, targets, mask, vocab_first, False, False)[0]


def _head_ce_fwd(h, w, targets, mask, vocab_first):
    # symbolic_zeros: `perturbed` says whether w is differentiated at all (full fine-tuning) or a
    # frozen weight (LoRA), so the [D, V] weight gradient is only computed when someone needs it.
    s, dh, dw = _head_ce_scan(h.value, w.value, targets.value, mask.value, vocab_first, h.perturbed, w.perturbed)
    return s, (dh, None if dw is None else dw.astype(w.value.dtype))


def _head_ce_bwd(vocab_first, res, g):
    dh, dw = res
    return (None if dh is None else dh * g.astype(dh.dtype), None if dw is None else dw * g.astype(dw.dtype),
            None, None)


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd, symbolic_zeros=True)


def chunked_ce_sum(hidden: jax.Array, weight: jax.Array, batch: Mapping[str, jax.Array], *,
                   chunk: int = 256, vocab_first: bool = False) -> tuple[jax.Array, jax.Array]:
    """`masked_ce_sum(hidden @ W, batch)` without ever forming the full [B, T, vocab] logits.

    `hidden` [B, T, D] are the final (normed) hidden states, `weight` the LM head: [D, V]
    (`lm_head.kernel`) or, with `vocab_first=True`, [V, D] (a tied `embedding`). About `chunk`
    tokens are processed at a time: `chunk // B` positions of every row (the last chunk
    zero-padded); value and gradients (w.r.t. hidden and weight) equal the unchunked loss's up to
    float summation order.

    >>> h = jnp.ones((1, 3, 2)); w = jnp.arange(8.0).reshape(2, 4)
    >>> b = {"input_ids": jnp.array([[1, 2, 3]])}
    >>> s, n = chunked_ce_sum(h, w, b, chunk=2)
    >>> bool(jnp.allclose(s, masked_ce_sum(h @ w, b)[0])), float(n)
    (True, 2.0)
    """
    targets, mask = targets_and_mask(batch)
    b, t = targets.shape
    # A chunk takes the same `c` positions of every row rather than `chunk` consecutive flattened
    # tokens: the batch axis (sharded over ('data', 'fsdp')) stays a batch axis, so each device
    # scans its own rows. Scanning a flattened, batch-sharded axis would make GSPMD gather it.
    c = max(1, min(t, chunk // b))
    pad = -t % c  # padded positions are masked out: they add 0 to the sum and get 0 gradient
    n = (t + pad) // c

    def split(x):  # [B, T, ...] -> zero-padded to [B, n*c, ...] -> [n, B, c, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n, c) + x.shape[2:]), 1, 0)

    s = _head_ce(split(hidden), weight, split(targets), split(mask), vocab_first)
    return s, mask.sum()
