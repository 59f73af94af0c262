"""Partition rules: which `PartitionSpec` every parameter gets, LoRA specs derived from their kernel's.

A rule list is ordered `[(regex, PartitionSpec)]`; the regex is `re.search`-ed against the dotted
leaf path (`model.layers.0.self_attn.q_proj.kernel`, or `model.layers.self_attn.q_proj.kernel`
when layers are stacked by `nn.scan`) and the first match wins. A rule's spec names the
*trailing* axes of the leaf: a stacked kernel [L, in, out] matched by `P('fsdp', 'tensor')` gets
`P(None, 'fsdp', 'tensor')` — the layer axis stays unsharded, so one rule serves scanned and
unscanned models alike.

LoRA leaves are never matched by rules: their specs are *derived* from the kernel they adapt,
so the low-rank matmuls line up with the kernel's own sharding (no resharding between x @ W and
x @ A @ B):

    kernel  [*stack, in, out]  spec (*S_stack, S_in, S_out)
    lora_a  [*stack, in,  r ]  spec (*S_stack, S_in, None)
    lora_b  [*stack, r,  out]  spec (*S_stack, None, S_out)
    lora_scale [*stack]        replicated
    lora_magnitude [*stack, out]  spec (*S_stack, S_out)   (DoRA)

(S_stack is None for scanned layers; MoE expert tensors [E, in, out] split E over 'expert'.) Rules
may name the optional axis 'expert' (OPTIONAL_AXES): on a mesh without it that entry is unsharded.

A quantized kernel (`lora_jax.quant.QuantizedKernel`) is matched by the kernel's rule and its
fields take specs derived from the kernel's (`lora_jax.quant.partition_specs`): codes and block
scales [*stack, out, in/k] get (*Nones, S_out, S_in), the tiny second-level tables replicated.

Errors are loud and name the param, its shape and the spec: a leaf with more than `min_size`
elements that no rule matches (small ones — norms, biases — are replicated), or a spec whose mesh
axes do not divide the dimension they split.

Default rules (`default_rules(family or model_type)`, declared by each family): FSDP over each matrix's model-dim axis, Megatron
tensor parallelism — q/k/v/gate/up (GPT-2 c_attn/c_fc) column-parallel (output axis over
'tensor'), o/down (GPT-2 c_proj) row-parallel (input axis over 'tensor'), embeddings and the LM
head split over the vocabulary by 'tensor' and the model dim by 'fsdp'.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.quant.kernel import is_quantized, partition_specs
from lora_jax.targeting import KernelLayout, resolve_layout
from lora_jax.tree import ADAPTER_LEAVES, CONSTANT_LEAVES, KERNEL, LORA_A, LORA_MAGNITUDE, LORA_SCALE, get, iter_leaves, put  # noqa: F401

Rules = Sequence[tuple[str, P]]

COLUMN = P("fsdp", "tensor")  # [in, out]: output features split by 'tensor'
ROW = P("tensor", "fsdp")  # [in, out]: input features split by 'tensor'
OPTIONAL_AXES = ("expert",)  # named by MoE rules; dropped (unsharded) on a mesh without them
DEFAULT_MIN_SIZE = 2**16  # leaves up to this many elements may go unmatched (replicated)


def default_rules(arch: str) -> Rules:
    """The default rules of a model family, named by family or HF model_type ('llama', 'qwen2', 'gpt2',
    'gemma2', 'qwen3_moe', ...): each family declares them (`lora_jax.models.families`).

    >>> default_rules("llama")[0][1]
    P('fsdp', 'tensor')
    """
    from lora_jax.models import families

    key = arch.lower().replace("-", "_")
    key = {"smollm": "llama", "smollm2": "llama"}.get(key, key)
    try:
        return tuple(families.for_name(key).rules)
    except ValueError:
        known = sorted({t for f in families.families() for t in (f.name, *f.model_types)})
        raise ValueError(f"no default partition rules for architecture {arch!r}; supported: {known} (or pass rules=)") from None


def __getattr__(name: str) -> Any:  # LLAMA_RULES / GPT2_RULES: the families' own lists
    if name in ("LLAMA_RULES", "GPT2_RULES"):
        return default_rules(name.split("_")[0])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _axis_size(mesh_shape: Mapping[str, int], entry: Any) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh_shape[n] for n in names if n is not None)


def check_spec(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh | None) -> None:
    """ValueError naming `name`, its shape and spec unless the spec fits the shape (and mesh).

    >>> check_spec("w", (8, 4), P("fsdp", None), None)
    """
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} for {name!r} has {len(spec)} entries but the param has shape {shape}")
    if mesh is None:
        return
    mesh_shape = dict(mesh.shape)
    for dim, entry in zip(shape, spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        for n in names:
            if n is not None and n not in mesh_shape:
                raise ValueError(f"partition spec {spec} for {name!r} {shape} names mesh axis {n!r}; the mesh has {tuple(mesh_shape)}")
        size = _axis_size(mesh_shape, entry)
        if dim % size:
            raise ValueError(
                f"partition spec {spec} does not fit {name!r} of shape {shape}: axis {entry!r} has {size} devices on mesh "
                f"{mesh_shape}, which does not divide dimension {dim}; change the rule for this param or the mesh shape"
            )


def _expand(spec: P, ndim: int) -> tuple:
    """Right-align a rule's spec to the leaf's rank: leading (stack) axes unsharded."""
    return (None,) * (ndim - len(spec)) + tuple(spec)


def _match(rules: Rules, name: str) -> P | None:
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec
    return None


def _drop_absent(spec: P, mesh: Mesh | None) -> P:
    """`spec` without the OPTIONAL_AXES the mesh lacks (all of them without a mesh).

    >>> _drop_absent(P("expert", "fsdp", None), None)
    P(None, 'fsdp', None)
    """
    have = set(mesh.axis_names) if mesh is not None else set()

    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(n for n in names if n is not None and (n not in OPTIONAL_AXES or n in have))
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(keep(e) for e in spec))


def _joined(entries: Sequence[Any]) -> Any:
    """One spec entry for a flattened group of axes (major-to-minor), e.g. DenseGeneral inputs."""
    names: list[str] = []
    for e in entries:
        names += [n for n in (e if isinstance(e, tuple) else (e,)) if n is not None]
    return None if not names else names[0] if len(names) == 1 else tuple(names)


def param_specs(
    params: Any,
    rules: Rules,
    mesh: Mesh | None = None,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> Any:
    """A tree of `PartitionSpec`s shaped like `params` (arrays or `jax.ShapeDtypeStruct`s).

    With `mesh`, every spec is checked to divide its param's shape. LoRA leaves get specs derived
    from their kernel's (module docstring); `layouts` as for `lora_jax.inject`.

    >>> import jax.numpy as jnp
    >>> q = {"q_proj": {"kernel": jnp.zeros((2, 8, 16)), "lora_a": jnp.zeros((2, 8, 4)), "lora_b": jnp.zeros((2, 4, 16))}}
    >>> specs = param_specs({"model": {"layers": {"self_attn": q}}}, default_rules("llama"))
    >>> specs["model"]["layers"]["self_attn"]["q_proj"]["lora_a"], specs["model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
    (P(None, 'fsdp', None), P(None, None, 'tensor'))
    """
    out: dict = {}
    kernel_specs: dict = {}  # the logical spec of each kernel, quantized ones included
    leaves = list(iter_leaves(params))
    for path, leaf in leaves:
        if path[-1] in ADAPTER_LEAVES:
            continue
        name, shape = ".".join(path), tuple(leaf.shape)
        spec = _match(rules, name)
        if spec is None:
            if math.prod(shape) > min_size:
                raise ValueError(
                    f"no partition rule matches {name!r} of shape {shape} ({math.prod(shape):,} elements > min_size="
                    f"{min_size:,}); add a (regex, PartitionSpec) rule for it (P() replicates it)"
                )
            spec = P()
        spec = _drop_absent(spec, mesh)
        check_spec(name, shape, spec, None)
        full = P(*_expand(spec, len(shape)))
        check_spec(name, shape, full, mesh)
        kernel_specs[path] = full
        if is_quantized(leaf):  # codes and block scales take specs derived from the kernel's
            full = partition_specs(leaf, tuple(full), lambda s, p: _fits(s, p, mesh))
            for field in ("codes", "absmax"):
                check_spec(f"{name}.{field}", tuple(getattr(leaf, field).shape), getattr(full, field), mesh)
        put(out, path, full)
    for path, leaf in leaves:
        if path[-1] not in ADAPTER_LEAVES:
            continue
        if path[-1] in CONSTANT_LEAVES:  # lora_scale / lora_rank: tiny, replicated
            put(out, path, P())
            continue
        name, shape = ".".join(path), tuple(leaf.shape)
        kpath = path[:-1] + (KERNEL,)
        try:
            kernel, kspec = get(params, kpath), tuple(kernel_specs[kpath])
        except (KeyError, TypeError):
            raise ValueError(f"LoRA leaf {name!r} has no sibling 'kernel'; compute specs on the combined (lora + frozen) tree") from None
        layout = resolve_layout(kpath, tuple(kernel.shape), layouts)
        in_axes, out_axes = layout.own_axes(len(kernel.shape))  # input axes need not lead (nn.Einsum)
        lead = tuple(kspec[: layout.stack])  # stacked axes keep the kernel's split (MoE experts over 'expert')
        if path[-1] == LORA_MAGNITUDE:  # DoRA's m [*stack, out]: sharded as the kernel's output axes
            spec = P(*lead, _joined([kspec[a] for a in out_axes]))
        else:
            spec = (P(*lead, _joined([kspec[a] for a in in_axes]), None) if path[-1] == LORA_A
                    else P(*lead, None, _joined([kspec[a] for a in out_axes])))
        check_spec(name, shape, spec, mesh)
        put(out, path, spec)
    return out


def _fits(shape: tuple[int, ...], spec: P, mesh: Mesh | None) -> bool:
    try:
        check_spec("", shape, spec, mesh)
    except ValueError:
        return False
    return True


def named_shardings(specs: Any, mesh: Mesh) -> Any:
    """`NamedSharding(mesh, spec)` for every spec in the tree.

    >>> from lora_jax.sharding.mesh import make_mesh
    >>> named_shardings({"w": P("fsdp")}, make_mesh(devices=jax.devices()[:1]))["w"].spec
    P('fsdp',)
    """
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
