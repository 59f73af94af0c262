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
