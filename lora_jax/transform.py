"""LoRA as a pure transform of a Flax parameter tree: inject, split/combine, merge/unmerge.

Before and after `inject` (r = 8, target_modules=["q_proj"]):

    {'model': {'layers': {'0': {'self_attn': {
        'q_proj': {'kernel': W[576, 576]},                  # frozen
    }}}}}
    ->
    {'model': {'layers': {'0': {'self_attn': {
        'q_proj': {'kernel': W[576, 576],                   # frozen, untouched
                   'lora_a': A[576, 8],                     # PEFT's lora_A (input side), Kaiming-uniform
                   'lora_b': B[8, 576]},                    # PEFT's lora_B (output side), zeros
    }}}}}

ΔW = A @ B · scale, in a Flax kernel's [in, out] orientation. A stacked kernel W[L, in, out]
(layers under `nn.scan`) gets A[L, in, r] and B[L, r, out]; a DenseGeneral kernel W[*in, *out]
gets A[prod(in), r] and B[r, prod(out)].

`split` / `combine` separate the adapter leaves from the frozen ones (equinox's partition/combine
on nested dicts): the trainable half is a small tree of only `lora_a`/`lora_b` leaves, so gradients
and optimizer state exist only for it. `merge` folds ΔW into the kernels (zero inference overhead)
and `unmerge` takes it back out. Every function is pure, returns new trees and works under `jit`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.core import unfreeze

from lora_jax.config import LoraConfig
from lora_jax.targeting import (
    KERNEL,
    LORA_A,
    LORA_B,
    LORA_LEAVES,
    KernelLayout,
    is_param_leaf,
    iter_leaves,
    module_key,
    resolve_layout,
    select_targets,
)

Params = Any


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _copy(tree: Any) -> Any:
    """Copy the dict structure (leaves shared): every transform returns a new tree."""
    tree = unfreeze(tree) if hasattr(tree, "unfreeze") else tree
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def has_lora(params: Params) -> bool:
    """Whether any `lora_a`/`lora_b` leaf is in the tree.

    >>> has_lora({"q": {"kernel": 1.0}})
    False
    """
    return any(p[-1] in LORA_LEAVES for p, _ in iter_leaves(params))


def _init_a(rng: jax.Array, shape: tuple[int, ...], config: LoraConfig, r: int) -> jax.Array:
    fan_in = shape[-2]
    if config.init == "gaussian":  # PEFT: nn.init.normal_(lora_A, std=1 / r)
        return jax.random.normal(rng, shape, config.jnp_dtype) / r
    # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in] -> U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, shape, config.jnp_dtype, -bound, bound)


def inject(params: Params, config: LoraConfig, rng: jax.Array, *, layouts: Mapping[str, KernelLayout] | None = None) -> Params:
    """Add `lora_a` / `lora_b` leaves next to every kernel `config` targets.

    Args:
      params: the model's 'params' collection (nested dicts).
      config: which kernels, which ranks.
      rng: PRNG key for A's initialisation (B starts at zero, so the output is unchanged).
      layouts: module key -> KernelLayout for kernels that are not [in, out] or stacked
        [L, in, out] (DenseGeneral/Einsum); `lora_jax.kernel_layouts(model, ...)` computes them.

    >>> import jax, jax.numpy as jnp
    >>> p = {"q_proj": {"kernel": jnp.zeros((16, 32))}}
    >>> p = inject(p, LoraConfig(r=4, target_modules=["q_proj"]), jax.random.key(0))
    >>> p["q_proj"]["lora_a"].shape, p["q_proj"]["lora_b"].shape
    ((16, 4), (4, 32))
    """
    if has_lora(params):
        raise ValueError("params already hold LoRA leaves; merge() or split() them off before injecting again")
    out = _copy(params)
    for i, path in enumerate(select_targets(params, config)):
        kernel = _get(params, path)
        key = module_key(path)
        stack, ins, outs = resolve_layout(path, kernel.shape, layouts).split(tuple(kernel.shape))
        r = config.rank_for(key)
        d_in, d_out = math.prod(ins), math.prod(outs)
        a = _init_a(jax.random.fold_in(rng, i), stack + (d_in, r), config, r)
        b = jnp.zeros(stack + (r, d_out), config.jnp_dtype)
        _set(out, path[:-1] + (LORA_A,), a)
        _set(out, path[:-1] + (LORA_B,), b)
    return out


def _partition(params: Params, keep_lora: bool) -> Params:
    out: dict = {}
    for path, leaf in iter_leaves(params):
        if (path[-1] in LORA_LEAVES) == keep_lora:
            _set(out, path, leaf)
    return out


def split(params: Params) -> tuple[Params, Params]:
    """(lora, frozen): the adapter leaves alone, and everything else — both nested dicts.

    >>> lora, frozen = split({"q": {"kernel": 1.0, "lora_a": 2.0, "lora_b": 3.0}})
    >>> lora, frozen
    ({'q': {'lora_a': 2.0, 'lora_b': 3.0}}, {'q': {'kernel': 1.0}})
    """
    return _partition(params, True), _partition(params, False)


def combine(*trees: Params) -> Params:
    """Deep-merge disjoint nested dicts; the inverse of `split`.

    >>> combine({"q": {"lora_a": 2.0}}, {"q": {"kernel": 1.0}})
    {'q': {'lora_a': 2.0, 'kernel': 1.0}}
    """
    out: dict = {}
    for tree in trees:
        for path, leaf in iter_leaves(tree):
            if _has_path(out, path):
                raise ValueError(f"combine: leaf {'.'.join(path)!r} is in more than one tree")
            _set(out, path, leaf)
    return out


def _has_path(tree: Mapping, path: tuple[str, ...]) -> bool:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return False
        tree = tree[k]
    return True


def trainable_mask(params: Params) -> Params:
    """Tree of bools, True exactly at LoRA leaves (for `optax.masked` and friends).

    >>> trainable_mask({"q": {"kernel": 1.0, "lora_a": 2.0}})
    {'q': {'kernel': False, 'lora_a': True}}
    """
    out: dict = {}
    for path, _ in iter_leaves(params):
        _set(out, path, path[-1] in LORA_LEAVES)
    return out


def delta_weight(a: jax.Array, b: jax.Array, scale: float, kernel_shape: tuple[int, ...]) -> jax.Array:
    """ΔW = A @ B · scale in fp32, shaped like the kernel (stacked axes batched).

    >>> delta_weight(jnp.ones((2, 1)), jnp.ones((1, 3)), 2.0, (2, 3)).sum()
    Array(12., dtype=float32)
    """
    dw = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return dw.reshape(kernel_shape)


def _adapted_modules(params: Params) -> list[tuple[str, ...]]:
    return [p[:-1] for p, _ in iter_leaves(params) if p[-1] == LORA_A]


def merge(params: Params, config: LoraConfig) -> Params:
    """Fold every adapter into its kernel (W += A @ B · scale) and drop the LoRA leaves.

    >>> import jax
    >>> p = inject({"q": {"kernel": jnp.zeros((4, 4))}}, LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))
    >>> sorted(merge(p, LoraConfig(r=2, target_modules=["q"]))["q"])
    ['kernel']
    """
    out = _copy(params)
    for mod in _adapted_modules(params):
        node = _get(out, mod)
        kernel, a, b = node[KERNEL], node.pop(LORA_A), node.pop(LORA_B)
        if is_param_leaf(kernel):  # a quantized base (lora_jax.quant): the merge is into its float values
            from lora_jax.quant.quantize import dequantize_params

            kernel = dequantize_params({"k": kernel}, warn=True)["k"]
        scale = config.scale_for(".".join(mod), a.shape[-1])
        node[KERNEL] = (kernel.astype(jnp.float32) + delta_weight(a, b, scale, kernel.shape)).astype(kernel.dtype)
    return out


def unmerge(merged: Params, lora: Params, config: LoraConfig) -> Params:
    """Take the adapters in `lora` back out of merged kernels (W -= A @ B · scale) and re-attach them.

    Exact up to floating-point rounding of the kernel's dtype.

    >>> import jax
    >>> cfg = LoraConfig(r=2, target_modules=["q"])
    >>> p = inject({"q": {"kernel": jnp.ones((4, 4))}}, cfg, jax.random.key(0))
    >>> lora, _ = split(p)
    >>> sorted(unmerge(merge(p, cfg), lora, cfg)["q"])
    ['kernel', 'lora_a', 'lora_b']
    """
    out = _copy(merged)
    for mod in _adapted_modules(lora):
        a, b = _get(lora, mod + (LORA_A,)), _get(lora, mod + (LORA_B,))
        node = _get(out, mod)
        kernel = node[KERNEL]
        scale = config.scale_for(".".join(mod), a.shape[-1])
        node[KERNEL] = (kernel.astype(jnp.float32) - delta_weight(a, b, scale, kernel.shape)).astype(kernel.dtype)
        node[LORA_A], node[LORA_B] = a, b
    return out
