"""Train only the adapters: an `optax.partition` optimizer and gradients w.r.t. the LoRA half.

Two equivalent ways, tested to give identical updates:

1. `optimizer(tx, params)` — `optax.partition` over the labels {'lora', 'frozen'}: `tx` for the
   trained LoRA leaves (A, B), `optax.set_to_zero()` (no state) for everything else, the adapters'
   `lora_scale` / `lora_rank` included. Drop-in for a full-tree training
   loop; optimizer state exists only for the LoRA leaves. In stacks padded to a common rank
   (`lora_rank`), the updates of the padded slots are zeroed after `tx` (weight decay included).
2. `lora_value_and_grad(loss_fn)` — differentiates only the LoRA partition, the frozen half closed
   over as a constant, so no full-size frozen gradient is ever built (the scales get zero
   gradients). Pair it with `optimizer(tx, lora)`. This is what `lora_jax.training` uses.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lora_jax.transform import combine, rank_slots, split, split_constants, trainable_mask
from lora_jax.tree import LORA_A, LORA_B, LORA_RANK, get, iter_leaves, map_paths

LORA_LABEL = "lora"
FROZEN_LABEL = "frozen"


def param_labels(params: Any) -> Any:
    """Tree of 'lora' / 'frozen' labels, one per leaf.

    >>> param_labels({"q": {"kernel": 1.0, "lora_a": 2.0, "lora_scale": 0.5}})
    {'q': {'kernel': 'frozen', 'lora_a': 'lora', 'lora_scale': 'frozen'}}
    """
    return jax.tree.map(lambda trained: LORA_LABEL if trained else FROZEN_LABEL, trainable_mask(params))


def optimizer(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
    """`tx` on the LoRA leaves, frozen leaves get zero updates and no optimizer state.

    >>> import jax.numpy as jnp, optax
    >>> p = {"q": {"kernel": jnp.ones(3), "lora_a": jnp.ones(2)}}
    >>> opt = optimizer(optax.adam(1e-3), p)
    >>> updates, _ = opt.update(p, opt.init(p), p)
    >>> float(abs(updates["q"]["kernel"]).sum())
    0.0
    """
    partitioned = optax.partition({LORA_LABEL: tx, FROZEN_LABEL: optax.set_to_zero()}, param_labels(params))
    masks = slot_masks(params)
    if masks is None:
        return partitioned

    def keep_real_slots(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m is None else (u * m).astype(u.dtype), updates, masks,
                            is_leaf=lambda x: x is None), state

    return optax.chain(partitioned, optax.GradientTransformation(lambda p: optax.EmptyState(), keep_real_slots))


def slot_masks(params: Any) -> Any:
    """Tree like `params`: for A/B of a padded stack (`lora_rank`) the 0/1 mask of its real rank
    slots (broadcastable), None elsewhere; None overall when nothing is padded.

    >>> slot_masks({"q": {"lora_a": jax.numpy.zeros((3, 2))}}) is None
    True
    """
    if not any(p[-1] == LORA_RANK for p, _ in iter_leaves(params)):
        return None

    def mask(path, leaf):
        if path[-1] not in (LORA_A, LORA_B):
            return None
        slots = rank_slots(get(params, path[:-1]))
        if slots is None:
            return None
        return (slots[..., None, :] if path[-1] == LORA_A else slots[..., :, None]).astype(leaf.dtype)

    return map_paths(mask, params)


def lora_value_and_grad(loss_fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """Turn `loss_fn(params, *args)` into `f(lora, frozen, *args) -> (value, grads_wrt_lora)`.

    Only the small `lora` tree is differentiated; `frozen` is closed over, so its (full-size)
    gradient is never computed.

    >>> import jax.numpy as jnp
    >>> loss = lambda p, x: (x @ p["q"]["kernel"] + x @ p["q"]["lora_a"]).sum()
    >>> p = {"q": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 2))}}
    >>> lora, frozen = split(p)
    >>> value, grads = lora_value_and_grad(loss)(lora, frozen, jnp.ones((1, 2)))
    >>> list(grads["q"])
    ['lora_a']
    """

    def wrapped(lora, frozen, *args, **kwargs):
        trained, constants = split_constants(lora)

        def on_lora(trained_):
            return loss_fn(combine(trained_, constants, frozen), *args, **kwargs)

        value, grads = jax.value_and_grad(on_lora, has_aux=has_aux)(trained)
        return value, combine(grads, jax.tree.map(jax.numpy.zeros_like, constants))

    return wrapped
