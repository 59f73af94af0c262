"""Parameter counts and PEFT's `print_trainable_parameters` line."""

from __future__ import annotations

import math
from typing import Any

from lora_jax.tree import LORA_A, LORA_LEAVES, LORA_RANK, get, is_adapter_leaf, is_constant_leaf, iter_leaves


def count_parameters(params: Any) -> tuple[int, int]:
    """(trainable, total) element counts as PEFT counts them: trainable = the LoRA A/B leaves
    (the adapters' `lora_scale` constants are not parameters). In a stack padded to a common rank
    (`lora_rank`), only each layer's real rank slots count, as PEFT's per-layer modules hold.

    >>> import jax.numpy as jnp
    >>> count_parameters({"q": {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 1))}})
    (4, 20)
    """
    trainable = total = 0
    for path, leaf in iter_leaves(params):
        if is_constant_leaf(path):
            continue
        n = math.prod(getattr(leaf, "shape", ()))
        if path[-1] in LORA_LEAVES and LORA_RANK in get(params, path[:-1]):
            shape = leaf.shape  # A [*stack, in, R] / B [*stack, R, out]: real slots = sum of the layers' ranks
            n = int(sum(int(r) for r in get(params, path[:-1])[LORA_RANK].ravel())) * (shape[-2] if path[-1] == LORA_A else shape[-1])
        total += n
        if is_adapter_leaf(path):
            trainable += n
    return trainable, total


def trainable_parameters_line(params: Any) -> str:
    """PEFT's summary line for a param tree (LoRA leaves are the trainable ones).

    >>> import jax.numpy as jnp
    >>> trainable_parameters_line({"q": {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 2))}})
    'trainable params: 8 || all params: 24 || trainable%: 33.3333'
    """
    trainable, total = count_parameters(params)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(params: Any) -> None:
    """Print PEFT's `print_trainable_parameters` line for a param tree.

    >>> import jax.numpy as jnp
    >>> print_trainable_parameters({"q": {"kernel": jnp.zeros((4, 4)), "lora_a": jnp.zeros((4, 1))}})
    trainable params: 4 || all params: 20 || trainable%: 20.0000
    """
    print(trainable_parameters_line(params))
