"""LoRA for flax.nnx models, unmodified: `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Einsum`.

`inject(model, config, rngs)` replaces, in place, every targeted module by a `LoraLinear` that
holds the original module as `base` and adds the adapter as variables of their own types:

    model.layers[0].attn.q_proj = nnx.Linear(...)                 # before
    ->
    model.layers[0].attn.q_proj = LoraLinear(
        base=nnx.Linear(...),                                    # frozen, untouched
        lora_a=LoraParam(A[in, r]),                              # PEFT's lora_A, Kaiming-uniform
        lora_b=LoraParam(B[r, out]),                             # PEFT's lora_B, zeros
        lora_scale=LoraScale(alpha / r),                         # a constant, never trained
        dropout=nnx.Dropout(config.dropout))                     # on the adapter input, in train mode

`LoraParam` subclasses `nnx.Param`, so `nnx.state(model, LoraParam)`, `nnx.split(model, LoraParam,
...)` and `nnx.Optimizer(model, tx, wrt=LoraParam)` / `nnx.grad(..., argnums=nnx.DiffState(0,
LoraParam))` see only the adapters. Targeting is the same language as for param trees
(`lora_jax.targeting`): the module key is the module's attribute path (`layers.0.attn.q_proj`),
so an nnx model whose attributes follow Hugging Face's names exports to PEFT
(`save_peft_adapter`) and loads PEFT adapters (`load_peft_adapter`). The forward is the same
unmerged `x @ W + dropout(x) @ A @ B · scale` as the linen path (`lora_jax.layers.lora_delta`);
an `nnx.Einsum` forms ΔW and runs it through the module's own equation (the wrapper and its
variable types: `lora_jax.nnx_layer`). `merge` / `unmerge` fold ΔW in and out of the base
kernels in place; `merge_and_unload` returns the plain model.
Modules stacked by `nnx.vmap` (kernels with extra leading layer axes, run under `nnx.scan`) get
stacked adapters A [L, in, r], B [L, r, out] and a scale per layer, which `nnx.scan` slices with
the kernel; they take one rank for all layers and no dropout (refused otherwise, one line).
PEFT in/out lives in `lora_jax.interop.nnx_adapter`, re-exported here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.config import ALL_LINEAR, PLAIN_INITS, LoraConfig
from lora_jax.nnx_layer import LoraLinear, LoraParam, LoraScale  # noqa: F401  (re-exported)
from lora_jax.targeting import KernelLayout, Layouts, _in_project_tree, einsum_in_axes, plan_targets
from lora_jax.transform import init_ab

_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def _layout(module: nnx.Module, key: str) -> KernelLayout:
    shape = tuple(module.kernel.shape)
    in_axes = None
    if isinstance(module, nnx.Linear):
        n_in, own = 1, (module.in_features, module.out_features)
    elif isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(f"nnx.LinearGeneral {key!r} has batch_axis; LoRA on batched LinearGeneral is not supported")
        n_in, own = len(module.in_features), tuple(module.in_features) + tuple(module.out_features)
    else:
        in_axes = einsum_in_axes(module.einsum_str)
        if not in_axes:
            raise ValueError(f"nnx.Einsum {key!r} ({module.einsum_str!r}) contracts no kernel axis with its input; nothing to adapt")
        n_in, own = len(in_axes), tuple(module.kernel_shape)
    stack = len(shape) - len(own)  # leading axes beyond the module's own: nnx.vmap'd layers
    if stack < 0 or shape[stack:] != own:
        raise ValueError(f"{type(module).__name__} {key!r} has a kernel of shape {shape}, not its own {own} behind leading "
                         "stacked axes (nnx.vmap with out_axes other than 0?); lora_jax stacks adapters on leading axes only")
    return KernelLayout(stack=stack, n_in=n_in, in_axes=in_axes)

def _modules(model: nnx.Module) -> list[tuple[tuple, str, nnx.Module]]:
    """(graph path, module key, module) of every Linear/LinearGeneral/Einsum/LoraLinear, wrappers' bases excluded;
    a module reachable under several paths is listed once, under its first (as PEFT names a shared module)."""
    nodes = [(tuple(path), node) for path, node in nnx.iter_graph(model)]
    bases = {id(node.base) for _, node in nodes if isinstance(node, LoraLinear)}
    return [(path, ".".join(str(p) for p in path), node) for path, node in nodes
            if isinstance(node, LoraLinear) or (isinstance(node, _SUPPORTED) and id(node) not in bases)]


def _paths_of(model: nnx.Module, wanted: set[int]) -> dict[int, list[tuple]]:
    """id -> every graph path that reaches that module (a module shared by two parents has two)."""
    out: dict[int, list[tuple]] = {}

    def walk(node, path, above):
        for key, child in nnx.graph.iter_children(node):
            if id(child) in wanted:
                out.setdefault(id(child), []).append(path + (key,))
            elif nnx.graph.is_graph_node(child) and not isinstance(child, nnx.Variable) and id(child) not in above:
                walk(child, path + (key,), above | {id(child)})

    walk(model, (), {id(model)})
    return out


def _set(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) or not hasattr(parent, str(p)) else getattr(parent, p)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def adapters(model: nnx.Module) -> dict[str, LoraLinear]:
    """module key -> LoraLinear for every adapted module of `model`."""
    return {key: m for _, key, m in _modules(model) if isinstance(m, LoraLinear)}


def inject(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs | jax.Array, *, model_type: str | None = None,
           output_module: str | None = None) -> nnx.Module:
    """Wrap every module `config` targets in a `LoraLinear`, in place; returns `model`.

    `model_type` resolves `target_modules=None` (PEFT's per-architecture default); `output_module`
    names the model's output layer for `all-linear` (needed unless the model follows HF's layout
    with `model.layers` / `transformer.h` and an `lm_head`); '' says it has none (tied logits).
    Model code may keep reading a wrapped module's attributes (`self.o_proj.kernel.shape`).

    >>> from flax import nnx
    >>> import lora_jax.nnx as lnnx
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(4, 8, rngs=rngs)
    >>> net = lnnx.inject(Net(nnx.Rngs(0)), LoraConfig(r=2, target_modules=["q_proj"]), nnx.Rngs(1))
    >>> net.q_proj.lora_a.shape, net.q_proj.lora_b.shape, float(net.q_proj.lora_scale[...])
    ((4, 2), (2, 8), 4.0)
    """
    if config.use_dora or config.init not in PLAIN_INITS:  # never silently plain LoRA instead
        raise ValueError(f"lora_jax.nnx.inject supports plain LoRA (init {PLAIN_INITS}), not "
                         f"{'use_dora=True' if config.use_dora else f'init={config.init!r}'}; use the linen path "
                         "(lora_jax.inject on a param tree) for DoRA / PiSSA / OLoRA")
    rngs = rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs)
    found = _modules(model)
    if any(isinstance(m, LoraLinear) for _, _, m in found):
        raise ValueError("the model already holds LoRA adapters; merge_and_unload() it before injecting again")
    if config.target_modules not in (ALL_LINEAR, None):  # a targeted Embed / Conv / norm would be silently skipped
        from lora_jax.targeting import is_target  # noqa: PLC0415

        for path, node in nnx.iter_graph(model):
            if (path and isinstance(node, nnx.Module) and not isinstance(node, _SUPPORTED + (LoraLinear,))
                    and any(isinstance(v, nnx.Param) for _, v in nnx.graph.iter_children(node))
                    and is_target(config, ".".join(str(p) for p in path))):
                raise ValueError(f"target_modules={config.target_modules!r} matches {'.'.join(str(p) for p in path)!r} "
                                 f"({type(node).__name__}): lora_jax.nnx adapts nnx.Linear / LinearGeneral / Einsum only (PEFT's "
                                 "Embedding/Conv LoRA is not supported); leave it out of target_modules")
    uses = _paths_of(model, {id(m) for _, _, m in found})  # a shared module answers to each of its names
    found = [(q, ".".join(str(part) for part in q), m) for p, _, m in found for q in uses.get(id(m), [p])]
    tree: dict = {}
    for _, key, m in found:
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})
        node["kernel"] = jax.ShapeDtypeStruct(m.kernel.shape, m.kernel.dtype)
    by_key = {k: (p, m) for p, k, m in found}
    if not by_key:
        raise ValueError("the model has no nnx.Linear / nnx.LinearGeneral / nnx.Einsum module to adapt")
    layouts, problems = {}, {}
    for k, (_, m) in by_key.items():
        try:
            layouts[k] = _layout(m, k)
        except ValueError as e:  # raised only if the module is a target
            layouts[k], problems[k] = KernelLayout(), e
    if output_module is not None:
        if output_module and output_module not in by_key:
            raise ValueError(f"output_module={output_module!r} is not an nnx.Linear / LinearGeneral / Einsum of the model (those "
                             f"are: {', '.join(sorted(by_key)[:8])}{', ...' if len(by_key) > 8 else ''}); a model whose logits "
                             "come from a tied embedding (Embed.attend) has none: pass output_module=''")
        layouts = Layouts(layouts, output_module=output_module)  # "": no key is the output layer
    elif config.target_modules == ALL_LINEAR and not _in_project_tree(tree):
        raise ValueError("target_modules='all-linear' must leave out the model's output layer, which lora_jax cannot tell "
                         "from this nnx model's names; pass output_module='<its attribute path>' (e.g. 'head'), or "
                         "output_module='' if it has none (logits from a tied Embed.attend)")
    probe = plan_targets(tree, config, layouts, model_type)
    key = rngs.params()
    done: set[int] = set()
    for i, t in enumerate(probe):
        mkey = ".".join(t.path[:-1])
        path, module = by_key[mkey]
        if id(module) in done:  # a shared module targeted under two names: one adapter
            continue
        done.add(id(module))
        if not path:
            raise ValueError(f"the model itself is a {type(module).__name__}; inject adapts submodules: wrap it in an nnx.Module")
        if mkey in problems:
            raise problems[mkey]
        stack, ins, outs = layouts[mkey].split(tuple(module.kernel.shape))
        if len(set(t.ranks)) != 1 or 0 in t.ranks:
            raise ValueError(f"LoraConfig gives the layers stacked in nnx module {mkey!r} different ranks or skips some; "
                             "lora_jax.nnx supports one rank per stacked module: use one rank, or build the layers as a list")
        if stack and config.dropout > 0:
            raise ValueError(f"lora_dropout on the stacked (nnx.vmap'd) module {mkey!r} is not supported; set lora_dropout=0 "
                             "or build the layers as a list")
        r = t.ranks[0]
        d_in, d_out = math.prod(ins), math.prod(outs)
        a, b = init_ab(jax.random.fold_in(key, i), stack, d_in, d_out, config, r)
        scale = jnp.asarray([alpha / math.sqrt(r) if config.use_rslora else alpha / r for alpha in t.alphas],
                            jnp.float32).reshape(stack)
        wrapper = LoraLinear(module, a, b, scale, config.dropout, rngs if config.dropout > 0 else None, layouts[mkey])
        for where in uses.get(id(module), [path]):  # a shared module is adapted wherever it is used
            _set(model, where, wrapper)
    return model


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (W += ΔW) in place; the forward then skips it.

    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(2, 3, rngs=rngs)
    >>> net = inject(Net(nnx.Rngs(0)), LoraConfig(r=1, target_modules=["q_proj"]), nnx.Rngs(1))
    >>> merge(net).q_proj.merged, unmerge(net).q_proj.merged
    (True, False)
    """
    return _fold(model, merged=True)


def unmerge(model: nnx.Module) -> nnx.Module:
    """Take merged adapters back out of their kernels (W -= ΔW) in place."""
    return _fold(model, merged=False)


def _fold(model: nnx.Module, merged: bool) -> nnx.Module:
    """Add (merged=True) or subtract every adapter's ΔW where it is not already in that state."""
    for m in adapters(model).values():
        if m.merged != merged:
            k = m.base.kernel
            delta = m._delta_kernel()
            k[...] = (k[...].astype(jnp.float32) + (delta if merged else -delta)).astype(k.dtype)
            m.merged = merged
    return model


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """Merge every adapter and put the plain base modules back: the model without LoRA.

    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(2, 3, rngs=rngs)
    >>> net = inject(Net(nnx.Rngs(0)), LoraConfig(r=1, target_modules=["q_proj"]), nnx.Rngs(1))
    >>> type(merge_and_unload(net).q_proj).__name__
    'Linear'
    """
    merge(model)
    wrappers = {id(m): m for _, _, m in _modules(model) if isinstance(m, LoraLinear)}
    for i, paths in _paths_of(model, set(wrappers)).items():
        for path in paths:
            _set(model, path, wrappers[i].base)
    return model


def count_parameters(model: nnx.Module) -> tuple[int, int]:
    """(trainable, total) as PEFT counts: trainable = LoraParam elements; scales are not params."""
    lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoraParam)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return lora, total


def trainable_parameters_line(model: nnx.Module) -> str:
    """PEFT's `print_trainable_parameters` line for an nnx model.

    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.q_proj = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
    >>> trainable_parameters_line(inject(Net(nnx.Rngs(0)), LoraConfig(r=2, target_modules=["q_proj"]), nnx.Rngs(1)))
    'trainable params: 16 || all params: 32 || trainable%: 50.0000'
    """
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def __getattr__(name: str):
    # PEFT in/out lives in lora_jax.interop.nnx_adapter (it builds on this module): imported on first use.
    if name in ("save_peft_adapter", "load_peft_adapter"):
        from lora_jax.interop import nnx_adapter  # noqa: PLC0415

        return getattr(nnx_adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
