"""LoRA for any Flax linen model, unmodified: intercept `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum`.

`lora_jax.apply(model.apply, config)` wraps a linen `apply` in `nn.intercept_methods`: whenever
one of those modules is called and its params hold `lora_a`/`lora_b` (added by `lora_jax.inject`),
the low-rank term is added to its output. Models written in plain Flax style need no change:

    params = lora_jax.inject(params, config, rng, layouts=lora_jax.kernel_layouts(model, x))
    logits = lora_jax.apply(model.apply, config)({"params": params}, x)

Dense and DenseGeneral take the unmerged path x·A·B·scale (ΔW never formed). `nn.Einsum` kernels
may contract in any axis order, so there ΔW is formed per call and pushed through the module's own
equation — correct for any equation, costlier. For arbitrary pure functions of a param tree the
fallback is merge-on-the-fly: `loss(lora_jax.merge(combine(lora, frozen), config))`, which forms
every ΔW each step (the costliest path; use it only where no module structure exists).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.layers import Dense, adapter_delta
from lora_jax.targeting import KERNEL, LORA_A, LORA_B, KernelLayout, iter_leaves, module_key
from lora_jax.tree import LORA_MAGNITUDE
from lora_jax.transform import adapter_scale, delta_weight

_INTERCEPTED = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _dense_general_axes(module: nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return tuple(sorted(a % ndim for a in axis))


def _einsum_n_in(module: nn.Einsum) -> int:
    inputs, _ = module.einsum_str.replace(" ", "").split("->")
    x_sub, k_sub = inputs.split(",")
    return sum(c in x_sub for c in k_sub)


def _lora_interceptor(config: LoraConfig) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _INTERCEPTED):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        if not module.has_variable("params", LORA_A):
            return y
        x = args[0] if args else kwargs["inputs"]
        if isinstance(module, nn.Einsum):
            node = module.variables["params"]
            if LORA_MAGNITUDE in node:
                raise ValueError(f"DoRA on nn.Einsum at {'.'.join(module.path)!r} is not supported; use DoRA on Dense/DenseGeneral "
                                 "kernels (exclude this module) or plain LoRA")
            kernel = node[KERNEL]
            scale = adapter_scale(node, config, ".".join(module.path))
            dw = delta_weight(node[LORA_A], node[LORA_B], scale, kernel.shape).astype(y.dtype)
            return y + jnp.einsum(module.einsum_str, x.astype(y.dtype), dw)
        if isinstance(module, nn.DenseGeneral):
            if module.batch_dims:
                raise NotImplementedError(f"LoRA on nn.DenseGeneral with batch_dims at {'.'.join(module.path)!r} is not supported")
            axes = _dense_general_axes(module, x.ndim)
            x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
            delta = adapter_delta(module, x.astype(y.dtype), config, n_in=len(axes))
            return y + delta.reshape(y.shape)
        return y + adapter_delta(module, x.astype(y.dtype), config)

    return interceptor


def apply(apply_fn: Callable, config: LoraConfig) -> Callable:
    """Wrap a linen `apply` so every Dense/DenseGeneral/Einsum with LoRA leaves adds its adapter.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, lora_jax
    >>> model = nn.Dense(3, name="proj")
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    >>> cfg = lora_jax.LoraConfig(r=1, target_modules=["proj"])
    >>> params = lora_jax.inject({"proj": params}, cfg, jax.random.key(1))["proj"]
    >>> lora_jax.apply(model.apply, cfg)({"params": params}, jnp.ones((1, 2))).shape
    (1, 3)
    """

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_lora_interceptor(config)):
            return apply_fn(*args, **kwargs)

    return wrapped


def kernel_layouts(model: nn.Module, *args, **kwargs) -> dict[str, KernelLayout]:
    """Exact `KernelLayout` of every Dense/DenseGeneral/Einsum kernel, by tracing `model.init` abstractly.

    Stacked axes (from `nn.scan`/`nn.vmap`) are the axes the param has beyond the kernel the module
    itself sees. Costs one abstract trace (no FLOPs, no memory).

    >>> import jax.numpy as jnp, flax.linen as nn
    >>> kernel_layouts(nn.DenseGeneral((2, 3), name="o"), jnp.ones((1, 4)))
    {'': KernelLayout(stack=0, n_in=1)}
    """
    local: dict[str, tuple[int, int]] = {}

    def recorder(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _INTERCEPTED + (Dense,)) and module.has_variable("params", KERNEL):
            x = a[0] if a else kw["inputs"]
            if isinstance(module, nn.DenseGeneral):
                n_in = len(_dense_general_axes(module, x.ndim))
            elif isinstance(module, nn.Einsum):
                n_in = _einsum_n_in(module)
            else:
                n_in = 1
            local[".".join(module.path)] = (module.get_variable("params", KERNEL).ndim, n_in)
        return out

    def init():
        with nn.intercept_methods(recorder):
            return model.init(jax.random.key(0), *args, **kwargs)

    variables = jax.eval_shape(init)
    layouts = {}
    for path, leaf in iter_leaves(variables.get("params", {})):
        key = module_key(path)
        if path[-1] == KERNEL and key in local:
            ndim, n_in = local[key]
            layouts[key] = KernelLayout(stack=leaf.ndim - ndim, n_in=n_in)
    return layouts
