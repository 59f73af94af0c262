"""LoRA for any Flax linen model, unmodified: intercept `nn.Dense` / `nn.DenseGeneral` / `nn.Einsum`.

`lora_jax.apply(model.apply, config)` wraps a linen `apply` in `nn.intercept_methods`: whenever
one of those modules is called and its params hold `lora_a`/`lora_b` (added by `lora_jax.inject`),
the low-rank term is added to its output. Models written in plain Flax style need no change:

    params = lora_jax.inject(params, config, rng, layouts=lora_jax.kernel_layouts(model, x))
    logits = lora_jax.apply(model.apply, config)({"params": params}, x)

Dense and DenseGeneral take the unmerged path x·A·B·scale (ΔW never formed). `nn.Einsum` kernels
may contract any of their axes, so there ΔW is formed per call (A over the contracted axes, B over
the others, put back in the kernel's axis order) and pushed through the module's own equation —
correct for any equation, costlier. For arbitrary pure functions of a param tree the
fallback is merge-on-the-fly: `loss(lora_jax.merge(combine(lora, frozen), config))`, which forms
every ΔW each step (the costliest path; use it only where no module structure exists).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.core import Var
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.layers import APPLY_CONFIG, Dense, adapter_delta
from lora_jax.targeting import KERNEL, LORA_A, LORA_B, KernelLayout, Layouts, einsum_in_axes, iter_leaves, module_key
from lora_jax.tree import LORA_MAGNITUDE
from lora_jax.transform import adapter_scale, delta_weight

_INTERCEPTED = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _dense_general_axes(module: nn.DenseGeneral, ndim: int) -> tuple[int, ...]:
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return tuple(sorted(a % ndim for a in axis))


def _lora_interceptor(config: LoraConfig) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _INTERCEPTED):
            if (context.method_name == "__call__" and not isinstance(module, Dense) and module.scope is not None
                    and module.has_variable("params", LORA_A)):
                raise ValueError(f"module {'.'.join(module.path)!r} ({type(module).__name__}) holds LoRA leaves, but "
                                 "lora_jax.apply adapts only nn.Dense / nn.DenseGeneral / nn.Einsum (and lora_jax.Dense); "
                                 "target those modules, or merge the adapters into the params (lora_jax.merge)")
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
            equation = _einsum_str(module, args, kwargs)
            in_axes = einsum_in_axes(equation)  # this call's kernel: no stacked axes here
            layout = KernelLayout(stack=0, n_in=len(in_axes), in_axes=in_axes)
            dw = delta_weight(node[LORA_A], node[LORA_B], scale, kernel.shape, layout).astype(y.dtype)
            return y + jnp.einsum(equation, x.astype(y.dtype), dw)
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
        token = APPLY_CONFIG.set(config)  # lora_jax.Dense layers built without lora= take this config's dropout
        try:
            with nn.intercept_methods(_lora_interceptor(config)):
                return apply_fn(*args, **kwargs)
        finally:
            APPLY_CONFIG.reset(token)

    return wrapped


def _einsum_str(module: nn.Einsum, args: tuple, kwargs: dict) -> str:
    """The equation of this call: the module's, or the one passed to `__call__(inputs, einsum_str)`."""
    given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    return given if given is not None else module.einsum_str


def _is_dense_call(module: nn.Module, context: Any) -> bool:
    """A call of a flax Dense / DenseGeneral / Einsum (or lora_jax.Dense) owning its kernel."""
    return context.method_name == "__call__" and isinstance(module, _INTERCEPTED + (Dense,)) and module.has_variable("params", KERNEL)


def _array_inputs(args: tuple, kwargs: dict) -> tuple[list, Callable]:
    """The array (or `jax.ShapeDtypeStruct`) leaves of a call's arguments, to trace, and how to put
    them back among the static ones (flags such as `train=False` stay Python values)."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))]

    def rebuild(arrays):
        full = list(leaves)
        for i, arr in zip(traced, arrays):
            full[i] = arr
        return jax.tree.unflatten(treedef, full)

    return [leaves[i] for i in traced], rebuild


def _output_is_post_processing(model: nn.Module, args: tuple, kwargs: dict, index: int, aval: Any) -> bool:
    """Whether the model's (single) output is a function of the `index`-th dense call's output
    alone (a cast, a soft-cap), not also of its input or params (a residual add, a final norm, a
    tied `Embed.attend`): that call's output is replaced by a free input and the model's jaxpr
    tells what the output depends on."""
    arrays, rebuild = _array_inputs(args, kwargs)

    def run(e, key, arrays):
        a, kw = rebuild(arrays)
        seen = [0]

        def replace(next_fun, fa, fkw, context):
            out = next_fun(*fa, **fkw)
            module = context.module
            if _is_dense_call(module, context):
                seen[0] += 1
                if seen[0] == index + 1:
                    return e
            return out

        with nn.intercept_methods(replace):
            return jax.tree.leaves(model.init_with_output(key, *a, **kw)[0])[0]

    try:
        closed = jax.make_jaxpr(run)(aval, jax.random.key(0), arrays)
    except Exception:  # noqa: BLE001  (a model this second trace cannot run: keep the shape rule)
        return True
    jaxpr = closed.jaxpr
    on_e, on_rest = {jaxpr.invars[0]}, set(jaxpr.invars[1:])
    for eqn in jaxpr.eqns:  # forward dependence; a call's outputs depend on all its inputs (conservative)
        ins = [v for v in eqn.invars if isinstance(v, Var)]
        if any(v in on_e for v in ins):
            on_e.update(eqn.outvars)
        if any(v in on_rest for v in ins):
            on_rest.update(eqn.outvars)
    out = jaxpr.outvars[0]
    return isinstance(out, Var) and out in on_e and out not in on_rest


def kernel_layouts(model: nn.Module, *args, **kwargs) -> Layouts:
    """Exact `KernelLayout` of every Dense/DenseGeneral/Einsum kernel, and the model's output layer,
    by tracing `model.init` abstractly (no FLOPs, no memory; sample inputs may be `jax.ShapeDtypeStruct`s).

    Stacked axes (from `nn.scan`/`nn.vmap`) are the axes the param has beyond the kernel the module
    itself sees. The output layer (`Layouts.output_module`, which `all-linear` leaves out as PEFT
    does) is the dense module whose output is the model's output, or whose output alone the model's
    output is computed from (a cast, a soft-cap; not a residual add, a final norm or a tied
    `Embed.attend`: a headless model has no output layer); else None. An `nn.Einsum` may contract
    any of its kernel's axes (`KernelLayout.in_axes`): A takes exactly the contracted ones, B the rest.

    >>> import jax.numpy as jnp, flax.linen as nn
    >>> layouts = kernel_layouts(nn.DenseGeneral((2, 3), name="o"), jnp.ones((1, 4)))
    >>> layouts, layouts.output_module
    ({'': KernelLayout(stack=0, n_in=1)}, '')
    """
    local: dict[str, tuple[tuple[int, ...], int, Any]] = {}
    refused: dict[str, str] = {}
    others: dict[str, str] = {}
    calls: list[tuple[str, Any]] = []

    def recorder(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        module = context.module
        if (context.method_name == "__call__" and not isinstance(module, _INTERCEPTED + (Dense,)) and module.scope is not None
                and module.has_variable("params", KERNEL) and nn.unbox(module.get_variable("params", KERNEL)).ndim > 2):
            others[".".join(module.path)] = f"{type(module).__module__}.{type(module).__qualname__}"  # nn.Conv, custom layers
        if _is_dense_call(module, context):
            key = ".".join(module.path)
            x = a[0] if a else kw["inputs"]
            if isinstance(module, nn.DenseGeneral):
                n_in = len(_dense_general_axes(module, x.ndim))
            elif isinstance(module, nn.Einsum):
                equation = _einsum_str(module, a, kw)
                in_axes = einsum_in_axes(equation)
                n_in = len(in_axes)
            else:
                n_in = 1
            if isinstance(module, nn.DenseGeneral) and module.batch_dims:
                refused[key] = f"LoRA on nn.DenseGeneral with batch_dims ({key!r}) is not supported; exclude this module"
            elif n_in == 0:
                refused[key] = f"nn.Einsum {key!r} ({equation!r}) contracts no kernel axis with its input; exclude it"
            own = tuple(nn.unbox(module.get_variable("params", KERNEL)).shape)
            local[key] = (own, n_in, in_axes if isinstance(module, nn.Einsum) else None)
            calls.append((key, out))
        return out

    arrays, rebuild = _array_inputs(args, kwargs)

    def init(arrays):
        a, kw = rebuild(arrays)
        with nn.intercept_methods(recorder):
            out, variables = model.init_with_output(jax.random.key(0), *a, **kw)
        final = jax.tree.leaves(out)
        nonlocal found, post
        found = next((k for k, y in reversed(calls) if any(y is f for f in final)), None)
        if found is None and calls and len(final) == 1 and getattr(calls[-1][1], "shape", None) == final[0].shape:
            post = (len(calls) - 1, jax.ShapeDtypeStruct(final[0].shape, calls[-1][1].dtype))
        return variables

    found: str | None = None
    post: tuple[int, Any] | None = None
    variables = nn.unbox(jax.eval_shape(init, arrays))  # nn.with_logical_partitioning boxes: their values
    if post is not None and _output_is_post_processing(model, args, kwargs, *post):
        found = calls[post[0]][0]
    layouts = Layouts(output_module=found)
    for key, kind in others.items():
        layouts.not_linear.add(key)
        layouts.refused[key] = (f"{key!r} ({kind}) is not a flax Dense / DenseGeneral / Einsum: lora_jax does not adapt it "
                                "(nor convolutions: PEFT's Conv LoRA is not supported); leave it out of target_modules")
    for path, leaf in iter_leaves(variables.get("params", {})):
        key = module_key(path)
        if path[-1] == KERNEL and key in local:
            own, n_in, in_axes = local[key]
            stack = leaf.ndim - len(own)
            if key in refused:
                layouts.refused[key] = refused[key]
                continue
            if tuple(leaf.shape[stack:]) != own:  # nn.scan/nn.vmap with variable_axes={'params': 1}, ...
                layouts.refused[key] = (
                    f"kernel {key!r} {tuple(leaf.shape)} is stacked by nn.scan/nn.vmap on an axis other than its first "
                    f"(each call sees {own}); lora_jax stacks adapters on leading axes only: use variable_axes={{'params': 0}} "
                    "(MaxText: param_scan_axis=0), or exclude this module")
                continue
            layouts[key] = KernelLayout(stack=stack, n_in=n_in, in_axes=in_axes)
    return layouts
