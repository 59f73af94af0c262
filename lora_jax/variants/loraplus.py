"""LoRA+: B learns `loraplus_lr_ratio` times faster than A — PEFT's `create_loraplus_optimizer` in optax.

PEFT sorts the trainable params into groups and gives each its own learning rate:

    group A     lora_A                                     lr
    group B     lora_B, and every 1-d param (DoRA's m)     lr · loraplus_lr_ratio
    embedding   LoRA on embedding layers                   loraplus_lr_embedding (default 1e-6)

`loraplus` builds the same split with `optax.partition`: one copy of your optimizer per group,
made by `make_tx(learning_rate)`, so schedules scale too (B's is `ratio · schedule(step)`). Our
trees hold the magnitude as m [*stack, out]; it is B-group by name (PEFT sees it per layer, 1-d).
lora_jax has no embedding LoRA (loading one is refused), so `loraplus_lr_embedding` is kept for
PEFT's signature and applies to nothing. Clip gradients outside (`optax.chain(clip, loraplus(...))`):
a clip inside `make_tx` would clip each group on its own. Weight decay: PEFT sets every group's decay
to its `loraplus_weight_decay` (default 0.0), overriding the optimizer's; here the decay is whatever
`make_tx` uses — pass the same value to reproduce PEFT.

>>> import jax.numpy as jnp, optax
>>> p = {"q": {"lora_a": jnp.ones(2), "lora_b": jnp.ones(2), "lora_scale": jnp.ones(())}}
>>> tx = loraplus(optax.sgd, 0.1, loraplus_lr_ratio=16.0)
>>> updates, _ = tx.update(p, tx.init(p), p)
>>> [round(float(updates["q"][k].ravel()[0]), 4) for k in ("lora_a", "lora_b", "lora_scale")]
[-0.1, -1.6, 0.0]
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from lora_jax.tree import LORA_A, LORA_B, LORA_MAGNITUDE, is_constant_leaf, map_paths

GROUP_A, GROUP_B, FROZEN = "loraplus_A", "loraplus_B", "frozen"


def loraplus_labels(tree: Any) -> Any:
    """PEFT's LoRA+ group of every leaf: A, B (B and DoRA's magnitude) or frozen (kernels, scales).

    >>> loraplus_labels({"q": {"kernel": 1, "lora_a": 1, "lora_b": 1, "lora_magnitude": 1, "lora_scale": 1}})
    {'q': {'kernel': 'frozen', 'lora_a': 'loraplus_A', 'lora_b': 'loraplus_B', 'lora_magnitude': 'loraplus_B', 'lora_scale': 'frozen'}}
    """
    def label(path, _):
        if is_constant_leaf(path):
            return FROZEN
        return {LORA_A: GROUP_A, LORA_B: GROUP_B, LORA_MAGNITUDE: GROUP_B}.get(path[-1], FROZEN)

    return map_paths(label, tree)


def _times(lr: Any, ratio: float) -> Any:
    return (lambda step: ratio * lr(step)) if callable(lr) else lr * ratio


def loraplus(make_tx: Callable[[Any], optax.GradientTransformation], lr: Any, loraplus_lr_ratio: float,
             loraplus_lr_embedding: float = 1e-6) -> optax.GradientTransformation:
    """`make_tx(lr)` on A, `make_tx(lr · loraplus_lr_ratio)` on B and DoRA's magnitude, nothing elsewhere.

    Args:
      make_tx: learning rate (float or optax schedule) -> optimizer, e.g. `lambda lr: optax.adamw(lr, weight_decay=0.01)`.
      lr: A's learning rate (PEFT's `lr`), a float or a schedule.
      loraplus_lr_ratio: ηB / ηA (PEFT: should be >= 1; any value > 0 is accepted).
      loraplus_lr_embedding: PEFT's rate for embedding LoRA; lora_jax has none (see module docstring).

    Works on any tree holding the LoRA leaves (the full params, the LoRA half, its trainable part).
    """
    if not isinstance(loraplus_lr_ratio, (int, float)) or not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be a number > 0 (PEFT recommends >= 1), got {loraplus_lr_ratio!r}")
    if not isinstance(loraplus_lr_embedding, (int, float)) or loraplus_lr_embedding < 0:
        raise ValueError(f"loraplus_lr_embedding must be a number >= 0, got {loraplus_lr_embedding!r}")
    return optax.partition({GROUP_A: make_tx(lr), GROUP_B: make_tx(_times(lr, float(loraplus_lr_ratio))),
                            FROZEN: optax.set_to_zero()}, loraplus_labels)
