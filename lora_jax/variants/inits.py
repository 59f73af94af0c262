"""PEFT's weight-rewriting initialisations (PiSSA, OLoRA) and their conversion to a plain LoRA.

`LoraConfig(init=...)` with one of these makes `lora_jax.inject` start A and B from the base weight
itself and subtract what they represent from it, so the adapted model is unchanged at step 0
(PEFT's `init_lora_weights`). In PyTorch's [out, in] orientation Wt = Wᵀ, s = the adapter's scale:

    pissa           Wt = V S Uh (full SVD); A = diag(sqrt(S_r / s)) Uh_r, B = V_r diag(sqrt(S_r / s))
    pissa_niter_N   the same from torch.svd_lowrank(Wt, q=r, niter=N) (Halko's randomized SVD; the
                    Gaussian sketch comes from our rng, not torch's, so A/B differ from a PEFT run
                    by the randomness of the sketch; `svd_lowrank(sketch=...)` reproduces torch's)
    olora           Wt = Q R; A = R[:r], B = Q[:, :r]                  (no 1/s: PEFT's olora_init)
    then            W_res = W - s · A B  (fp32, cast back to the kernel's dtype)

The kernels in the returned params are W_res. Keep the adapter you started from
(`initial = lora_jax.split(params)[0]`): an adapter trained on W_res is shared as PEFT documents
(`path_initial_model_for_weight_conversion`), as a plain LoRA of rank 2r on the ORIGINAL base:
ΔW = s·A B − s·A₀ B₀ = s·[A | A₀] [B ; −B₀], alpha doubled (× sqrt 2 with rsLoRA) so the scale stays s.
`convert_to_lora` does that; `save_peft_adapter` refuses an unconverted weight-rewriting adapter.
PiSSA needs a float base (PEFT: "initialize PiSSA under float32 ... then re-quantize the residual");
quantized kernels are refused for both inits here.

>>> import jax, jax.numpy as jnp
>>> w = jax.random.normal(jax.random.key(0), (6, 4))
>>> a, b, w_res = init_from_weight(w, 2, 0.5, "pissa", jax.random.key(1))
>>> bool(jnp.allclose(w_res + 0.5 * a @ b, w, atol=1e-5)), a.shape, b.shape
(True, (6, 2), (2, 4))
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.tree import (KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_RANK, LORA_SCALE, copy_tree, get, is_param_leaf,
                           iter_leaves, put)

_NITER = re.compile(r"pissa_niter_(\d+)")


def rewrites_base(init: str) -> bool:
    """Whether `init` rewrites the base weights (PiSSA / OLoRA).

    >>> rewrites_base("pissa_niter_4"), rewrites_base("olora"), rewrites_base("gaussian")
    (True, True, False)
    """
    return init in ("pissa", "olora") or bool(_NITER.fullmatch(init))


def svd_lowrank(wt: jax.Array, q: int, niter: int, rng: jax.Array | None = None, sketch: jax.Array | None = None):
    """torch.svd_lowrank(wt, q, niter) for one matrix: (U [m, q], S [q], V [n, q]), Halko et al. 4.4.

    The Gaussian sketch R [min-side n, q] is drawn from `rng`, or given as `sketch` (torch draws
    `torch.randn(n, q)` where n is the longer side's partner: see torch._lowrank).

    >>> u, s, v = svd_lowrank(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 2, 4, jax.random.key(0))
    >>> [round(float(x), 4) for x in s]
    [3.0, 2.0]
    """
    m, n = wt.shape
    a = wt.T if m < n else wt
    if sketch is None:
        sketch = jax.random.normal(rng, (a.shape[-1], q), jnp.float32)
    x = a @ sketch
    basis = jnp.linalg.qr(x)[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(a.T @ basis)[0]
        basis = jnp.linalg.qr(a @ basis)[0]
    u, s, vh = jnp.linalg.svd(basis.T @ a, full_matrices=False)
    u, v = basis @ u, vh.T
    return (v, s, u) if m < n else (u, s, v)


def init_from_weight(kernel2d: jax.Array, r: int, scale: float, init: str, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A [in, r], B [r, out], W_res [in, out]) for one kernel W [in, out], all fp32 (see module docstring)."""
    wt = kernel2d.astype(jnp.float32).T  # PEFT's [out, in]
    if init == "olora":
        q_, r_ = jnp.linalg.qr(wt)
        lora_a, lora_b = r_[:r], q_[:, :r]
    else:
        niter = _NITER.fullmatch(init)
        if niter:
            v, s, u = svd_lowrank(wt, r, int(niter.group(1)), rng)
            uh = u.T
        else:
            v, s, uh = jnp.linalg.svd(wt, full_matrices=False)
            v, s, uh = v[:, :r], s[:r], uh[:r]
        root = jnp.sqrt(s / scale)
        lora_a, lora_b = root[:, None] * uh, v * root[None, :]
    a, b = lora_a.T, lora_b.T
    return a, b, kernel2d.astype(jnp.float32) - scale * (a @ b)


def init_stacked(kernel: jax.Array, stack: tuple[int, ...], d_in: int, d_out: int, r: int, scale: Any, init: str,
                 rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`init_from_weight` for a kernel with leading stacked axes (each layer on its own, with its own
    scale: `scale` is a number or [*stack]): A, B, W_res."""
    w = kernel.reshape((-1, d_in, d_out))
    keys = jax.random.split(rng, w.shape[0])
    scales = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), stack).reshape(-1)
    a, b, res = jax.vmap(lambda w_, s_, k: init_from_weight(w_, r, s_, init, k))(w, scales, keys)
    return a.reshape(stack + (d_in, r)), b.reshape(stack + (r, d_out)), res.reshape(kernel.shape)


def _matricized(kernel: jax.Array, layout: Any) -> jax.Array:
    """The kernel with its axes in (stack, inputs, outputs) order: an Einsum contracting a middle axis
    ("btd,hdk->bthk", kernel [h, d, k]) is [d, h, k] here, as A [d, r] and B [r, h·k] see it."""
    if layout.in_axes is None:
        return kernel
    ins, outs = layout.own_axes(kernel.ndim)
    return kernel.transpose(tuple(range(layout.stack)) + ins + outs)


def variant_init(target: Any, kernel: Any, leaves: dict, config: LoraConfig, rng: jax.Array) -> tuple[Any, dict]:
    """(kernel, adapter leaves) of one planned target after PiSSA/OLoRA (W -> W_res, A/B from W) and
    DoRA (magnitude = ||W + s·A@B||, PEFT: after the init). Called by `lora_jax.inject`."""
    key = ".".join(target.path[:-1])
    if LORA_RANK in leaves:
        raise ValueError(f"{key!r} is a stack whose layers differ in rank (or skip layers); init={config.init!r} / "
                         "use_dora need one rank per stack: build the model with scan_layers=False")
    stack, ins, outs = target.layout.split(tuple(kernel.shape))
    d_in, d_out = math.prod(ins), math.prod(outs)
    a, b, scale = leaves[LORA_A], leaves[LORA_B], leaves[LORA_SCALE]
    leaves = dict(leaves)
    if rewrites_base(config.init):
        if is_param_leaf(kernel):
            raise ValueError(f"init={config.init!r} rewrites the base weights and needs a float kernel, but {key!r} is "
                             "quantized; inject into the float model, then quantize the residual (as PEFT advises)")
        if a.shape[-1] > min(d_in, d_out):
            raise ValueError(f"init={config.init!r} at {key!r}: rank {a.shape[-1]} exceeds min(in, out) = {min(d_in, d_out)} "
                             "of its kernel, so the SVD/QR has too few vectors (PEFT silently makes a smaller adapter "
                             "than its config says); lower r or give this module a rank_pattern entry")
        a, b, res = init_stacked(_matricized(kernel, target.layout), stack, d_in, d_out, a.shape[-1], scale, config.init, rng)
        leaves[LORA_A], leaves[LORA_B] = a.astype(config.jnp_dtype), b.astype(config.jnp_dtype)
        kernel = target.layout.to_kernel(res.reshape(stack + (d_in, d_out)), kernel.shape).astype(kernel.dtype)
    if config.use_dora:
        from lora_jax.variants.dora import init_magnitude

        w = kernel
        if is_param_leaf(w):  # a quantized base: the norm of its float values (PEFT dequantizes too)
            from lora_jax.quant.quantize import dequantize_params

            w = dequantize_params({"k": w})["k"]
        leaves[LORA_MAGNITUDE] = init_magnitude(_matricized(w, target.layout).reshape(stack + (d_in, d_out)), a, b,
                                                scale).astype(config.jnp_dtype)
    return kernel, leaves


def convert_to_lora(params: Any, initial: Any, config: LoraConfig) -> tuple[Any, LoraConfig]:
    """A PiSSA/OLoRA-trained model as (params on the ORIGINAL base with a plain rank-2r LoRA, its config).

    `params` hold W_res and the trained A, B; `initial` is the adapter right after `inject`
    (`lora_jax.split(params0)[0]`). Returns params whose kernels are W = W_res + s·A₀B₀ and whose
    adapters are [A | A₀], [B ; −B₀] (same scale), and the LoraConfig to export them with
    (init="default", r and rank_pattern doubled; `save_peft_adapter` writes the alpha from the scale).

    >>> cfg = LoraConfig(r=1, target_modules=["q"], init="olora")
    >>> p0 = lora_jax.inject({"q": {"kernel": jnp.eye(3)}}, cfg, jax.random.key(0))
    >>> p, c = convert_to_lora(p0, lora_jax.split(p0)[0], cfg)
    >>> p["q"]["lora_a"].shape, c.r, c.init, bool(jnp.allclose(p["q"]["kernel"], jnp.eye(3)))
    ((3, 2), 2, 'default', True)
    """
    if not rewrites_base(config.init):
        raise ValueError(f"convert_to_lora converts PiSSA/OLoRA adapters; this config has init={config.init!r}, "
                         "whose adapters already apply to the original base as they are")
    out = copy_tree(params)
    mods = [p[:-1] for p, _ in iter_leaves(params) if p[-1] == LORA_A]
    for mod in mods:
        node, init = get(out, mod), get(initial, mod)
        if LORA_MAGNITUDE in node:
            raise ValueError(f"{'.'.join(mod)!r} is DoRA: a DoRA adapter is not a LoRA delta, so it cannot be "
                             "converted to one; export it with its residual base instead")
        scale = jnp.asarray(node[LORA_SCALE], jnp.float32)
        if not jnp.allclose(scale, jnp.asarray(init[LORA_SCALE], jnp.float32)):
            raise ValueError(f"the initial adapter at {'.'.join(mod)!r} has another scale; pass the adapter from this run's inject")
        a0, b0 = init[LORA_A].astype(jnp.float32), init[LORA_B].astype(jnp.float32)
        kernel = node[KERNEL]
        dw0 = (jnp.matmul(a0, b0) * scale[..., None, None]).reshape(kernel.shape)
        node[KERNEL] = (kernel.astype(jnp.float32) + dw0).astype(kernel.dtype)
        node[LORA_A] = jnp.concatenate([node[LORA_A], a0.astype(node[LORA_A].dtype)], axis=-1)
        node[LORA_B] = jnp.concatenate([node[LORA_B], -b0.astype(node[LORA_B].dtype)], axis=-2)
    ranks = {k: 2 * v for k, v in config.rank_pattern.items()}
    return out, dataclasses.replace(config, r=2 * config.r, rank_pattern=ranks, init="default", alpha_pattern={},
                                    alpha=2 * config.alpha if not config.use_rslora else config.alpha * 2**0.5)


import lora_jax  # noqa: E402  (doctest namespace)
