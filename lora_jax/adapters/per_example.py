"""Per-example adapters: each batch row runs its own adapter (or `"__base__"`), in inference and training.

N adapters are stacked into one *bank*: a LoRA tree whose leaves gain a leading adapter axis, ranks
zero-padded to the largest (a padded column of A meets a zero row of B, so outputs and gradients of
the padding are exactly zero), modules an adapter lacks filled with zeros and scale 0:

    lora tree k:  {'q_proj': {'lora_a': A_k[*stack, in, r_k], 'lora_b': B_k[*stack, r_k, out], 'lora_scale': s_k[*stack]}}
    bank:         {'q_proj': {'lora_a': A[N, *stack, in, R], 'lora_b': B[N, *stack, R, out], 'lora_scale': s[N, *stack]}}

`attach(frozen, bank)` puts it into the param tree next to each kernel, the adapter axis moved
behind the stacked layer axes (so `nn.scan` slices layers, not adapters):

    {'q_proj': {'kernel': W, 'lora_bank_a': A[*stack, N, in, R], 'lora_bank_b': [*stack, N, R, out],
                'lora_bank_scale': [*stack, N]}}

and `apply(model.apply, adapter_ids)` runs the model with, in every adapted Dense, row b adding
x_b · A[id_b] · B[id_b] · s[id_b] for the whole batch at once (no pass per adapter): for small banks
(N·R <= 512) as x @ [A_1..A_N] masked to each row's block @ [B_1;..;B_N] (two big matmuls), else as
per-row gathered A, B (batched matmuls); id -1 = `"__base__"` adds nothing (PEFT's `adapter_names=`).

Training: `make_multi_train_step(model, tx)` differentiates the bank. The loss is the SUM over
adapters of each adapter's mean token loss over its own rows, so adapter k's gradient is exactly
the gradient of its own batch's mean loss (rows of other adapters do not reach it: the gather's
transpose scatters each row's gradient to its adapter only). With an elementwise optimizer (Adam,
AdamW, SGD...) and `max_grad_norm` clipping applied per adapter, one step equals N separate steps.
Swapping an adapter for another of the same shapes (`swap_adapter`) changes array values only, so
the compiled forward and step are reused.

>>> import jax, jax.numpy as jnp, lora_jax
>>> cfg = lora_jax.LoraConfig(r=2, target_modules=["q"])
>>> t = lora_jax.split(lora_jax.inject({"q": {"kernel": jnp.ones((4, 3))}}, cfg, jax.random.key(0)))[0]
>>> bank = stack_adapters([t, t])
>>> bank["q"]["lora_a"].shape, adapter_ids(["b", "__base__"], ["a", "b"]).tolist()
((2, 4, 2), [1, -1])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.layers import Dense
from lora_jax.training.loss import targets_and_mask, token_losses
from lora_jax.transform import combine, split_constants
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE, copy_tree, get, has_path, iter_leaves, put

BASE = "__base__"
BANK_A, BANK_B, BANK_SCALE = "lora_bank_a", "lora_bank_b", "lora_bank_scale"
_BANK = {LORA_A: BANK_A, LORA_B: BANK_B, LORA_SCALE: BANK_SCALE}


def _modules(tree: Any) -> dict[tuple, dict]:
    return {p[:-1]: get(tree, p[:-1]) for p, _ in iter_leaves(tree) if p[-1] == LORA_A}


def stack_adapters(trees: Sequence[Any], rank: int | None = None) -> dict:
    """One bank from N LoRA trees (leading adapter axis, ranks zero-padded to `rank` or the largest)."""
    mods = [_modules(t) for t in trees]
    for m in mods:
        for key, node in m.items():
            if LORA_MAGNITUDE in node:
                raise ValueError(f"{'.'.join(key)!r} is a DoRA adapter; per-example adapters take plain LoRA "
                                 "(PEFT refuses adapter_names= with DoRA too)")
    keys = sorted(set().union(*mods))
    r_max = rank or max(n[LORA_A].shape[-1] for m in mods for n in m.values())
    bank: dict = {}
    for key in keys:
        like = next(m[key] for m in mods if key in m)
        stack, d_in, d_out = like[LORA_A].shape[:-2], like[LORA_A].shape[-2], like[LORA_B].shape[-1]
        a, b, s = [], [], []
        for m in mods:
            node = m.get(key)
            if node is None:
                a.append(jnp.zeros(stack + (d_in, r_max), like[LORA_A].dtype))
                b.append(jnp.zeros(stack + (r_max, d_out), like[LORA_B].dtype))
                s.append(jnp.zeros(stack, jnp.float32))
                continue
            r = node[LORA_A].shape[-1]
            if r > r_max:
                raise ValueError(f"adapter rank {r} at {'.'.join(key)!r} exceeds the bank's rank {r_max}")
            pad = [(0, 0)] * len(stack)
            a.append(jnp.pad(node[LORA_A], pad + [(0, 0), (0, r_max - r)]))
            b.append(jnp.pad(node[LORA_B], pad + [(0, r_max - r), (0, 0)]))
            s.append(jnp.broadcast_to(jnp.asarray(node.get(LORA_SCALE, 1.0), jnp.float32), stack))
        put(bank, key + (LORA_A,), jnp.stack(a))
        put(bank, key + (LORA_B,), jnp.stack(b))
        put(bank, key + (LORA_SCALE,), jnp.stack(s))
    return bank


def unstack_adapter(bank: Any, k: int, like: Any) -> dict:
    """Adapter k of the bank as a LoRA tree with the modules and ranks of `like` (its original tree)."""
    out: dict = {}
    for key, node in _modules(like).items():
        r = node[LORA_A].shape[-1]
        b = get(bank, key)
        put(out, key + (LORA_A,), b[LORA_A][k][..., :r])
        put(out, key + (LORA_B,), b[LORA_B][k][..., :r, :])
        put(out, key + (LORA_SCALE,), b[LORA_SCALE][k])
    return out


def swap_adapter(bank: Any, k: int, tree: Any) -> dict:
    """The bank with adapter k replaced by `tree` (padded to the bank's rank): same shapes, no recompile."""
    rank = next(n[LORA_A].shape[-1] for n in _modules(bank).values())
    one = stack_adapters([tree], rank=rank)
    for key in _modules(one):
        if not has_path(bank, key + (LORA_A,)):
            raise ValueError(f"the new adapter has {'.'.join(key)!r}, which the bank has no slot for; rebuild the bank")
    out = copy_tree(bank)
    for key, node in _modules(bank).items():
        for leaf in (LORA_A, LORA_B, LORA_SCALE):
            new = get(one, key)[leaf][0] if has_path(one, key) else jnp.zeros_like(node[leaf][0])
            get(out, key)[leaf] = node[leaf].at[k].set(new.astype(node[leaf].dtype))
    return out


def adapter_ids(rows: Sequence[str], names: Sequence[str]) -> jax.Array:
    """int32 [B]: each row's adapter index in `names`, -1 for "__base__".

    >>> adapter_ids(["x", "__base__"], ["x"]).tolist()
    [0, -1]
    """
    index = {n: i for i, n in enumerate(names)}
    bad = [r for r in rows if r != BASE and r not in index]
    if bad:
        raise ValueError(f"adapter {bad[0]!r} is not among the bank's adapters {list(names)}; add it or use '__base__'")
    return jnp.asarray([index.get(r, -1) for r in rows], jnp.int32)


def attach(frozen: Any, bank: Any) -> dict:
    """The param tree: `frozen` with the bank next to each kernel (adapter axis behind the stack axes)."""
    out = copy_tree(frozen)
    for key, node in _modules(bank).items():
        if not has_path(frozen, key + (KERNEL,)):
            raise ValueError(f"the bank adapts {'.'.join(key)!r}, which has no kernel in the frozen params")
        n_stack = node[LORA_A].ndim - 3
        for leaf, name in _BANK.items():
            put(out, key + (name,), jnp.moveaxis(node[leaf], 0, n_stack))
    return out


DENSE_MAX = 512  # N·R up to which the masked one-matmul form is used (else per-row gathers)


def _bank_delta(x: jax.Array, a: jax.Array, b: jax.Array, s: jax.Array, ids: jax.Array) -> jax.Array:
    """Row b of x [B, ..., in] times A[id_b] B[id_b] s[id_b]; id -1 adds zero.

    Small banks (N·R <= DENSE_MAX): two plain matmuls over all adapters' factors side by side,
    x @ [A_1 .. A_N] -> [tokens, N·R], masked to each row's own block (and scaled), @ [B_1; ..; B_N]:
    large, well-shaped matmuls, and a masked block gets no gradient. Larger banks: per-row gathered
    A[id_b], B[id_b] and batched matmuls (N-independent FLOPs). Both equal the per-row product.
    """
    if x.shape[0] != ids.shape[0]:
        raise ValueError(f"per-example adapters: the layer input has {x.shape[0]} rows but adapter_ids has {ids.shape[0]}; "
                         "give one adapter id per batch row")
    n, d_in, r = a.shape
    x3 = x.reshape(x.shape[0], -1, d_in)
    if n * r <= DENSE_MAX:
        pick = (ids[:, None] == jnp.arange(n)[None, :]).astype(jnp.float32) * s[None, :].astype(jnp.float32)  # [B, N]
        a_all = jnp.moveaxis(a, 0, 1).reshape(d_in, n * r).astype(x.dtype)
        h = (x3 @ a_all).reshape(x3.shape[:2] + (n, r)) * pick.astype(x.dtype)[:, None, :, None]
        out = h.reshape(x3.shape[:2] + (n * r,)) @ b.reshape(n * r, -1).astype(x.dtype)
        return out.reshape(x.shape[:-1] + (b.shape[-1],))
    idx = jnp.clip(ids, 0, n - 1)
    scale = jnp.where(ids >= 0, s[idx], 0.0).astype(x.dtype)
    h = jnp.einsum("bti,bir->btr", x3, a[idx].astype(x.dtype))
    out = jnp.einsum("btr,bro->bto", h, b[idx].astype(x.dtype)) * scale[:, None, None]
    return out.reshape(x.shape[:-1] + (b.shape[-1],))


def apply(apply_fn: Callable, ids: jax.Array) -> Callable:
    """Wrap a linen `apply` so every Dense holding a bank adds row b's adapter `ids[b]` (-1: none).

    >>> import flax.linen as nn
    >>> cfg = lora_jax.LoraConfig(r=1, target_modules=["q"])
    >>> m = nn.Dense(2, name="q"); p = {"q": m.init(jax.random.key(0), jnp.ones((1, 3)))["params"]}
    >>> t = lora_jax.split(lora_jax.inject(p, cfg, jax.random.key(1)))[0]
    >>> full = attach(lora_jax.split(p)[1], stack_adapters([t]))
    >>> apply(m.apply, jnp.array([0, -1]))({"params": full["q"]}, jnp.ones((2, 3))).shape
    (2, 2)
    """
    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (Dense, nn.Dense)) or not module.has_variable("params", BANK_A):
            return y
        x = args[0] if args else kwargs["inputs"]
        a, b, s = (module.get_variable("params", n) for n in (BANK_A, BANK_B, BANK_SCALE))
        return y + _bank_delta(x.astype(y.dtype), a, b, s, ids).astype(y.dtype)

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    return wrapped


def per_adapter_loss(logits: jax.Array, batch: Mapping[str, jax.Array], n: int) -> tuple[jax.Array, jax.Array]:
    """(Σ_k mean loss of adapter k's rows, [n] per-adapter mean losses); rows with id -1 are not counted."""
    targets, mask = targets_and_mask(batch)
    tl = token_losses(logits, targets) * mask
    ids = batch["adapter_ids"]
    onehot = (ids[:, None] == jnp.arange(n)[None, :]).astype(jnp.float32)  # [B, n]
    sums, counts = onehot.T @ tl.sum(1), onehot.T @ mask.sum(1)
    losses = sums / jnp.maximum(counts, 1.0)
    return losses.sum(), losses


def clip_per_adapter(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied to each adapter's slice (axis 0 of every bank leaf) on its own."""
    def update(updates, state, params=None):
        leaves = jax.tree.leaves(updates)
        sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim))) for g in leaves)
        norm = jnp.sqrt(sq)  # [N]
        factor = jnp.where(norm < max_norm, 1.0, max_norm / jnp.maximum(norm, 1e-30))
        return jax.tree.map(lambda g: g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_multi_state(bank: Any, tx: optax.GradientTransformation) -> dict:
    """{"bank", "opt_state", "step"}: the optimizer state covers A and B of every adapter (not the scales)."""
    return {"bank": bank, "opt_state": tx.init(split_constants(bank)[0]), "step": jnp.zeros((), jnp.int32)}


def make_multi_train_step(model: nn.Module, tx: optax.GradientTransformation, *, max_grad_norm: float | None = None) -> Callable:
    """`step(state, frozen, batch) -> (state, {"loss": [N] per-adapter losses})`, one jit for the whole bank.

    `batch` holds input_ids [B, T] (+ labels or targets/loss_mask, optional attention_mask) and
    adapter_ids [B]. `max_grad_norm` clips each adapter's gradient by its own global norm. The
    compiled step is cached by shapes: `step.traces()` counts traces (hot swaps add none); `step.init(bank)`
    makes the matching state.
    """
    full_tx = optax.chain(clip_per_adapter(max_grad_norm), tx) if max_grad_norm else tx
    counter = {"n": 0}

    def step(state, frozen, batch):
        counter["n"] += 1
        trained, constants = split_constants(state["bank"])
        n = next(iter(jax.tree.leaves(constants))).shape[0]

        def loss_fn(tr):
            params = attach(frozen, combine(tr, constants))
            inputs = {"input_ids": batch["input_ids"]}
            if "attention_mask" in batch:
                inputs["attention_mask"] = batch["attention_mask"]
            logits = apply(model.apply, batch["adapter_ids"])({"params": params}, **inputs)[0]
            return per_adapter_loss(logits, batch, n)

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
        updates, opt_state = full_tx.update(grads, state["opt_state"], trained)
        bank = combine(optax.apply_updates(trained, updates), constants)
        return {"bank": bank, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": losses}

    jitted = jax.jit(step, donate_argnums=(0,))

    def run(state, frozen, batch):
        return jitted(state, frozen, dict(batch))

    run.traces = lambda: counter["n"]  # type: ignore[attr-defined]
    run.init = lambda bank: init_multi_state(bank, full_tx)  # type: ignore[attr-defined]
    return run


def forward(model: nn.Module) -> Callable:
    """A jitted `f(frozen, bank, input_ids, adapter_ids) -> logits` (one compile per shape; `f.traces()`).

    >>> f = forward(nn.Dense(2))
    >>> f.traces()
    0
    """
    counter = {"n": 0}

    def fwd(frozen, bank, input_ids, ids):
        counter["n"] += 1
        out = apply(model.apply, ids)({"params": attach(frozen, bank)}, input_ids)
        return out[0] if isinstance(out, tuple) else out

    jitted = jax.jit(fwd)
    run = lambda *a: jitted(*a)  # noqa: E731
    run.traces = lambda: counter["n"]  # type: ignore[attr-defined]
    return run


import lora_jax  # noqa: E402  (doctest namespace)
