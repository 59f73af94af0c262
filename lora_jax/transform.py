"""LoRA as a pure transform of a Flax parameter tree: inject, split/combine, merge/unmerge.

Before and after `inject` (r = 8, target_modules=["q_proj"]):

    {'model': {'layers': {'0': {'self_attn': {
        'q_proj': {'kernel': W[576, 576]},                  # frozen
    }}}}}
    ->
    {'model': {'layers': {'0': {'self_attn': {
        'q_proj': {'kernel': W[576, 576],                   # frozen, untouched
                   'lora_a': A[576, 8],                     # PEFT's lora_A (input side), Kaiming-uniform
                   'lora_b': B[8, 576],                     # PEFT's lora_B (output side), zeros
                   'lora_scale': s[]},                      # alpha / r (PEFT's scaling), fp32, not trained
    }}}}}

ΔW = A @ B · scale, in a Flax kernel's [in, out] orientation. A stacked kernel W[L, in, out]
(layers under `nn.scan`) gets A[L, in, r], B[L, r, out] and a scale per layer s[L]; a DenseGeneral
kernel W[*in, *out] gets A[prod(in), r] and B[r, prod(out)].

The scale is a leaf of the adapter, not a property of the model: an adapter swapped in with
`combine(other_lora, frozen)` brings its own r/alpha, and merge, the forward and export all read it.

`split` / `combine` separate the adapter leaves from the frozen ones (equinox's partition/combine
on nested dicts): the LoRA half is a small tree of `lora_a`/`lora_b`/`lora_scale` leaves, so
gradients and optimizer state exist only for it (and never for the scale). `merge` folds ΔW into the kernels (zero inference overhead)
and `unmerge` takes it back out. Every function is pure, returns new trees and works under `jit`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import unfreeze
from flax.core.meta import AxisMetadata

from lora_jax.config import PLAIN_INITS, LoraConfig
from lora_jax.targeting import KernelLayout, Target, plan_targets, resolve_layout
from lora_jax.tree import (
    KERNEL,
    LORA_A,
    LORA_B,
    LORA_MAGNITUDE,
    LORA_RANK,
    LORA_SCALE,
    copy_tree,
    filter_tree,
    get,
    has_path,
    is_adapter_leaf,
    is_constant_leaf,
    is_param_leaf,
    iter_leaves,
    map_paths,
    put,
)

Params = Any

def has_lora(params: Params) -> bool:
    """Whether any `lora_a`/`lora_b` leaf is in the tree.

    >>> has_lora({"q": {"kernel": 1.0}})
    False
    """
    return any(p[-1] == LORA_A for p, _ in iter_leaves(params))


def _init_a(rng: jax.Array, shape: tuple[int, ...], config: LoraConfig, r: Any) -> jax.Array:
    fan_in = shape[-2]
    if config.init == "gaussian":  # PEFT: nn.init.normal_(lora_A, std=1 / r)
        r = jnp.asarray(r, jnp.float32).reshape(jnp.shape(r) + (1, 1))
        return (jax.random.normal(rng, shape, jnp.float32) / jnp.maximum(r, 1)).astype(config.jnp_dtype)
    # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in] -> U(-1/sqrt(in), 1/sqrt(in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(rng, shape, config.jnp_dtype, -bound, bound)


def _init_b(rng: jax.Array, shape: tuple[int, ...], config: LoraConfig, r: Any) -> jax.Array:
    """B [*stack, R, out]: zeros, or for init="random" (PEFT's init_lora_weights=False) torch's
    nn.Linear default on lora_B.weight [out, r]: U(-1/sqrt(r), 1/sqrt(r)), per layer's own rank r
    (`r` may be an array [*stack]; a layer of rank 0 gets zeros)."""
    if config.init != "random":
        return jnp.zeros(shape, config.jnp_dtype)
    r = jnp.asarray(r, jnp.float32).reshape(jnp.shape(r) + (1, 1))
    bound = jnp.where(r > 0, 1.0 / jnp.sqrt(jnp.maximum(r, 1.0)), 0.0)
    return (jax.random.uniform(jax.random.fold_in(rng, 1), shape, jnp.float32, -1.0, 1.0) * bound).astype(config.jnp_dtype)


def init_ab(rng: jax.Array, stack: tuple[int, ...], d_in: int, d_out: int, config: LoraConfig, r: int) -> tuple[jax.Array, jax.Array]:
    """(A [*stack, in, r], B [*stack, r, out]) of one rank-r adapter at init, as PEFT draws them.

    init="orthogonal" (PEFT's): A = N·Q_odd / 10, B = Q_evenᵀ·N / 10 from one random orthogonal Q
    [r, r] per layer, so A, B are nonzero and A @ B = 0; PEFT's rule: r must be even.

    >>> a, b = init_ab(jax.random.key(0), (), 6, 5, LoraConfig(r=4, init_lora_weights="orthogonal"), 4)
    >>> a.shape, b.shape, bool(jnp.abs(a @ b).max() < 1e-6), bool(jnp.abs(b).max() > 0)
    ((6, 4), (4, 5), True, True)
    """
    if config.init != "orthogonal":
        return _init_a(rng, stack + (d_in, r), config, r), _init_b(rng, stack + (r, d_out), config, r)
    if r % 2:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead (PEFT's rule)")
    k_q, k_a, k_b = jax.random.split(rng, 3)
    q = jnp.linalg.qr(jax.random.normal(k_q, stack + (r, r), jnp.float32))[0]
    a = jax.random.normal(k_a, stack + (d_in, r // 2), jnp.float32) @ q[..., 0::2, :] / 10.0
    b = jnp.swapaxes(q[..., 1::2, :], -1, -2) @ jax.random.normal(k_b, stack + (r // 2, d_out), jnp.float32) / 10.0
    return a.astype(config.jnp_dtype), b.astype(config.jnp_dtype)


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return 0.0 if r == 0 else alpha / math.sqrt(r) if rslora else alpha / r


def _adapter(target: Target, kernel_shape: tuple[int, ...], config: LoraConfig, rng: jax.Array) -> dict:
    """The adapter leaves of one planned target: uniform stacks as before; stacks whose layers
    differ in rank (or skip layers) padded to the largest rank with a `lora_rank` leaf."""
    stack, ins, outs = target.layout.split(kernel_shape)
    d_in, d_out = math.prod(ins), math.prod(outs)
    scales = [_scale(a, r, config.use_rslora) for a, r in zip(target.alphas, target.ranks)]
    if len(set(target.ranks)) == 1:  # one rank everywhere (per-layer alphas live in the scale vector)
        r = target.ranks[0]
        a, b = init_ab(rng, stack, d_in, d_out, config, r)
        return {LORA_A: a, LORA_B: b, LORA_SCALE: jnp.asarray(scales, jnp.float32).reshape(stack)}
    if config.init == "orthogonal":
        raise ValueError(f"init='orthogonal' on {'.'.join(target.path[:-1])!r}, a stack whose layers differ in rank (or skip "
                         "layers), is not supported; build the model with scan_layers=False")
    ranks = jnp.asarray(target.ranks, jnp.int32).reshape(stack)
    r_max = max(target.ranks)
    slots = jnp.arange(r_max) < ranks[..., None]  # [*stack, R]: True where a layer's rank reaches
    a = _init_a(rng, stack + (d_in, r_max), config, ranks) * slots[..., None, :]
    b = _init_b(rng, stack + (r_max, d_out), config, ranks) * slots[..., :, None]
    return {LORA_A: a.astype(config.jnp_dtype), LORA_B: b.astype(config.jnp_dtype),
            LORA_SCALE: jnp.asarray(scales, jnp.float32).reshape(stack), LORA_RANK: ranks}


def rank_slots(node: Mapping) -> jax.Array | None:
    """[*stack, R] bools: which rank slots of a padded adapter are real (None: all of them).

    >>> rank_slots({"lora_rank": jnp.array([2, 0])}).tolist(), rank_slots({})
    ([[True, True], [False, False]], None)
    """
    if LORA_RANK not in node:
        return None
    ranks = jnp.asarray(node[LORA_RANK])
    r_max = node[LORA_A].shape[-1] if LORA_A in node else int(ranks.max())
    return jnp.arange(r_max) < ranks[..., None]


def zero_padded_slots(tree: Params) -> Params:
    """`tree` with every padded rank slot (past a layer's `lora_rank`) of A and B set to zero.

    Idempotent and cheap; `lora_jax.optimizer` and the train step apply it to each update so no
    optimizer (weight decay, noise, ...) ever moves a slot PEFT would not have.

    >>> t = {"q": {"lora_a": jnp.ones((2, 3, 2)), "lora_b": jnp.ones((2, 2, 3)), "lora_rank": jnp.array([1, 0])}}
    >>> zero_padded_slots(t)["q"]["lora_a"].sum(axis=1).tolist()
    [[3.0, 0.0], [0.0, 0.0]]
    """
    out = copy_tree(tree)
    for path, leaf in iter_leaves(tree):
        if path[-1] != LORA_RANK:
            continue
        node = get(out, path[:-1])
        slots = rank_slots(node)
        if LORA_A in node:
            node[LORA_A] = jnp.where(slots[..., None, :], node[LORA_A], 0).astype(node[LORA_A].dtype)
        if LORA_B in node:
            node[LORA_B] = jnp.where(slots[..., :, None], node[LORA_B], 0).astype(node[LORA_B].dtype)
    return out


def inject(params: Params, config: LoraConfig, rng: jax.Array, *, layouts: Mapping[str, KernelLayout] | None = None,
           model_type: str | None = None) -> Params:
    """Add `lora_a` / `lora_b` / `lora_scale` leaves next to every kernel `config` targets.

    Args:
      params: the model's 'params' collection (nested dicts).
      config: which kernels, which ranks (PEFT's matching, layer by layer in stacks).
      rng: PRNG key for A's initialisation (B starts at zero, so the output is unchanged; with
        init="random", PEFT's init_lora_weights=False, B is drawn too).
      layouts: module key -> KernelLayout for kernels that are not [in, out] or a project model's
        stacked [L, in, out] (DenseGeneral/Einsum, user scans): `lora_jax.kernel_layouts(model, x)`
        computes them, and tells `all-linear` which module is the output layer.
      model_type: the HF model_type, for `target_modules=None` (PEFT's per-architecture default);
        the project's own trees are recognised without it.

    A stacked kernel whose layers get different ranks, alphas or are not all targeted
    (`rank_pattern` / `alpha_pattern` / `exclude_modules` / `layers_to_transform` per layer) gets
    A/B padded to its largest rank, a per-layer `lora_scale` (0 where a layer is not adapted) and
    a `lora_rank` leaf; the padded slots are zero and stay zero (`lora_jax.optimizer` masks them).

    >>> import jax, jax.numpy as jnp
    >>> p = {"q_proj": {"kernel": jnp.zeros((16, 32))}}
    >>> p = inject(p, LoraConfig(r=4, target_modules=["q_proj"]), jax.random.key(0))
    >>> p["q_proj"]["lora_a"].shape, p["q_proj"]["lora_b"].shape
    ((16, 4), (4, 32))
    """
    if isinstance(params, (nnx.Module, nnx.State)):
        raise ValueError(f"inject takes a linen param tree, got a flax.nnx {type(params).__name__}; for nnx models use "
                         "lora_jax.nnx.inject(model, config, rngs)")
    if any(isinstance(x, AxisMetadata) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, AxisMetadata))):
        raise ValueError("params hold flax metadata boxes (nn.Partitioned / nn.with_logical_partitioning); "
                         "unbox them first: inject(flax.linen.unbox(params), ...)")
    if has_lora(params):
        raise ValueError("params already hold LoRA leaves; merge() or split() them off before injecting again")
    out = copy_tree(params)
    for i, target in enumerate(plan_targets(params, config, layouts, model_type)):
        kernel = get(params, target.path)
        leaves = _adapter(target, tuple(kernel.shape), config, jax.random.fold_in(rng, i))
        if config.use_dora or config.init not in PLAIN_INITS:  # lora_jax.variants: PiSSA/OLoRA, DoRA
            from lora_jax.variants.inits import variant_init  # noqa: PLC0415

            new_kernel, leaves = variant_init(target, kernel, leaves, config, jax.random.fold_in(rng, i))
            if new_kernel is not kernel:
                put(out, target.path, new_kernel)
        for name, leaf in leaves.items():
            put(out, target.path[:-1] + (name,), leaf)
    return out


def split(params: Params) -> tuple[Params, Params]:
    """(lora, frozen): the adapter leaves (A, B and their scale), and everything else.

    >>> lora, frozen = split({"q": {"kernel": 1.0, "lora_a": 2.0, "lora_b": 3.0, "lora_scale": 0.5}})
    >>> lora, frozen
    ({'q': {'lora_a': 2.0, 'lora_b': 3.0, 'lora_scale': 0.5}}, {'q': {'kernel': 1.0}})
    """
    return filter_tree(params, is_adapter_leaf), filter_tree(params, lambda p: not is_adapter_leaf(p))


def split_constants(tree: Params) -> tuple[Params, Params]:
    """(trainable, constants) of a LoRA (or full) tree: the scales are constants, all else trains.

    >>> split_constants({"q": {"lora_a": 2.0, "lora_scale": 0.5}})
    ({'q': {'lora_a': 2.0}}, {'q': {'lora_scale': 0.5}})
    """
    return filter_tree(tree, lambda p: not is_constant_leaf(p)), filter_tree(tree, is_constant_leaf)


def combine(*trees: Params) -> Params:
    """Deep-merge disjoint nested dicts; the inverse of `split`.

    >>> combine({"q": {"lora_a": 2.0}}, {"q": {"kernel": 1.0}})
    {'q': {'lora_a': 2.0, 'kernel': 1.0}}
    """
    out: dict = {}
    for tree in trees:
        for path, leaf in iter_leaves(tree):
            if has_path(out, path):
                raise ValueError(f"combine: leaf {'.'.join(path)!r} is in more than one tree")
            put(out, path, leaf)
    return out


def trainable_mask(params: Params) -> Params:
    """Tree of bools, True exactly at the trained LoRA leaves (for `optax.masked` and friends).

    >>> trainable_mask({"q": {"kernel": 1.0, "lora_a": 2.0, "lora_scale": 0.5}})
    {'q': {'kernel': False, 'lora_a': True, 'lora_scale': False}}
    """
    return map_paths(lambda p, _: is_adapter_leaf(p) and not is_constant_leaf(p), params)


def adapter_scale(node: Any, config: LoraConfig | None, key: str) -> Any:
    """The scale of the adapter in module `node` (its params dict) at module key `key`.

    The adapter's own `lora_scale` leaf when it has one; otherwise `config`'s scale for `key`,
    refusing an adapter whose rank is not the one `config` gives (its alpha would be a guess).

    >>> adapter_scale({"lora_a": jnp.zeros((4, 2)), "lora_scale": 3.0}, None, "q")
    3.0
    """
    if LORA_SCALE in node:
        return node[LORA_SCALE]
    if config is None:
        raise ValueError(f"the adapter at {key!r} has no lora_scale leaf and no LoraConfig was given to scale it; "
                         "pass the LoraConfig it was created with")
    r = node[LORA_A].shape[-1]
    if r != config.rank_for(key):
        raise ValueError(f"the adapter at {key!r} has rank {r} but the LoraConfig gives {config.rank_for(key)}, and it "
                         "carries no lora_scale; pass the adapter's own LoraConfig (or re-inject/load it)")
    return config.scale_for(key, r)


def delta_weight(a: jax.Array, b: jax.Array, scale: Any, kernel_shape: tuple[int, ...],
                 layout: KernelLayout | None = None) -> jax.Array:
    """ΔW = A @ B · scale in fp32, shaped like the kernel (stacked axes batched; a stacked scale
    [*stack] scales each layer's product); `layout` puts the axes in the kernel's order where its
    input axes are not the leading ones (`KernelLayout.in_axes`).

    >>> delta_weight(jnp.ones((2, 1)), jnp.ones((1, 3)), 2.0, (2, 3)).sum()
    Array(12., dtype=float32)
    """
    scale = jnp.asarray(scale, jnp.float32)
    dw = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale[..., None, None]
    return dw.reshape(kernel_shape) if layout is None else layout.to_kernel(dw, tuple(kernel_shape))


def _adapted_modules(params: Params) -> list[tuple[str, ...]]:
    return [p[:-1] for p, _ in iter_leaves(params) if p[-1] == LORA_A]


def merge(params: Params, config: LoraConfig | None = None, *, layouts: Mapping[str, KernelLayout] | None = None) -> Params:
    """Fold every adapter into its kernel (W += A @ B · scale) and drop the adapter leaves.

    The scale is each adapter's own `lora_scale`; `config` is needed only for adapters without one.
    `layouts` as for `inject`: a kernel of 3+ axes outside the project's layer containers
    (DenseGeneral / Einsum / user scans) needs its layout, never guessed.

    >>> import jax
    >>> p = inject({"q": {"kernel": jnp.zeros((4, 4))}}, LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))
    >>> sorted(merge(p)["q"])
    ['kernel']
    """
    out = copy_tree(params)
    for mod in _adapted_modules(params):
        node = get(out, mod)
        scale = adapter_scale(node, config, ".".join(mod))
        kernel, a, b = node[KERNEL], node.pop(LORA_A), node.pop(LORA_B)
        node.pop(LORA_SCALE, None)
        magnitude = node.pop(LORA_MAGNITUDE, None)
        node.pop(LORA_RANK, None)
        if is_param_leaf(kernel):  # a quantized base (lora_jax.quant): the merge is into its float values
            from lora_jax.quant.quantize import dequantize_params

            kernel = dequantize_params({"k": kernel}, warn=True)["k"]
        layout = resolve_layout(mod + (KERNEL,), tuple(kernel.shape), layouts)
        if magnitude is not None:  # DoRA: W' = m / ||W + ΔW|| · (W + ΔW)
            if layout.in_axes is not None:
                raise ValueError(f"DoRA on {'.'.join(mod)!r}, a kernel whose input axes are not its leading ones, is not supported")
            from lora_jax.variants.dora import merged_kernel  # noqa: PLC0415

            w2d = kernel.reshape(a.shape[:-1] + b.shape[-1:])
            node[KERNEL] = merged_kernel(w2d, a, b, scale, magnitude).reshape(kernel.shape).astype(kernel.dtype)
            continue
        node[KERNEL] = (kernel.astype(jnp.float32) + delta_weight(a, b, scale, kernel.shape, layout)).astype(kernel.dtype)
    return out


def unmerge(merged: Params, lora: Params, config: LoraConfig | None = None, *,
            layouts: Mapping[str, KernelLayout] | None = None) -> Params:
    """Take the adapters in `lora` back out of merged kernels (W -= A @ B · scale) and re-attach them.

    Exact up to floating-point rounding of the kernel's dtype.

    >>> import jax
    >>> cfg = LoraConfig(r=2, target_modules=["q"])
    >>> p = inject({"q": {"kernel": jnp.ones((4, 4))}}, cfg, jax.random.key(0))
    >>> lora, _ = split(p)
    >>> sorted(unmerge(merge(p), lora)["q"])
    ['kernel', 'lora_a', 'lora_b', 'lora_scale']
    """
    out = copy_tree(merged)
    for mod in _adapted_modules(lora):
        adapter = get(lora, mod)
        if LORA_MAGNITUDE in adapter:
            raise ValueError(f"the adapter at {'.'.join(mod)!r} is DoRA, whose merge cannot be undone without the base "
                             "weights (PEFT keeps a cached norm); keep the unmerged params instead of unmerging")
        scale = adapter_scale(adapter, config, ".".join(mod))
        node = get(out, mod)
        kernel = node[KERNEL]
        layout = resolve_layout(mod + (KERNEL,), tuple(kernel.shape), layouts)
        delta = delta_weight(adapter[LORA_A], adapter[LORA_B], scale, kernel.shape, layout)
        node[KERNEL] = (kernel.astype(jnp.float32) - delta).astype(kernel.dtype)
        node.update({k: v for k, v in adapter.items()})
    return out
