"""`LoraLinear`: an nnx `Linear` / `LinearGeneral` / `Einsum` plus its LoRA adapter, and the adapter's variable types.

The wrapper keeps the original module as `base` and adds `lora_a` / `lora_b` (`LoraParam`, trained)
and `lora_scale` (`LoraScale`, a constant); A/B take their sharding metadata from the kernel's.
`lora_jax.nnx.inject` builds these; the forward is `base(x) + dropout(x) @ A @ B · scale`
(`lora_jax.layers.lora_delta`), or ΔW through an Einsum's own equation.

>>> issubclass(LoraParam, nnx.Param), issubclass(LoraScale, nnx.Param)
(True, False)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.layers import lora_delta
from lora_jax.targeting import KernelLayout
from lora_jax.transform import delta_weight


class LoraParam(nnx.LoRAParam):
    """The trained adapter factors (A and B): an `nnx.Param` (and flax's own `nnx.LoRAParam`, so code
    written for `nnx.LoRA` trains them too), so filters can pick them alone."""


class LoraScale(nnx.Variable):
    """The adapter's scale (PEFT's alpha/r): part of the adapter, never trained."""


def _adapter_shardings(kernel: nnx.Variable, layout: KernelLayout) -> tuple[dict, dict, dict]:
    """Sharding metadata for A [*stack, in, r], B [*stack, r, out] and the scale [*stack], derived from the
    kernel's `out_sharding` (as `lora_jax.sharding` derives LoRA specs from a kernel's): A takes the
    input axes' name, B the output axes', each the name of the group's first axis when the others are
    unsharded (a flattened group is split like its first axis), the rank axis none."""
    names = kernel.get_metadata("out_sharding", None) if hasattr(kernel, "get_metadata") else None
    if names is None or len(names) != kernel.ndim:
        return {}, {}, {}
    extra = {k: kernel.get_metadata(k) for k in ("sharding_rules", "mesh") if kernel.get_metadata(k, None) is not None}
    # placed now, as the kernels were, where a mesh is known; else the metadata waits for nnx.get_partition_spec
    extra["eager_sharding"] = bool(kernel.get_metadata("eager_sharding", False)) and (
        "mesh" in extra or not jax.sharding.get_abstract_mesh().empty)
    ins, outs = layout.own_axes(kernel.ndim)
    stack = tuple(names[: layout.stack])

    def group(axes):
        first, rest = names[axes[0]], [names[a] for a in axes[1:]]
        return first if all(n is None for n in rest) else None

    return ({"out_sharding": stack + (group(ins), None), **extra}, {"out_sharding": stack + (None, group(outs)), **extra},
            {"out_sharding": stack, **extra})


class LoraLinear(nnx.Module):
    """A targeted `nnx.Linear` / `LinearGeneral` / `Einsum` (`base`) plus its LoRA adapter."""

    def __init__(self, base: nnx.Module, a: jax.Array, b: jax.Array, scale: float, dropout: float, rngs: nnx.Rngs | None,
                 layout: KernelLayout = KernelLayout()):
        self.base = base
        self.in_axes = layout.in_axes  # static: the kernel's input axes when they are not its leading ones
        self.own_ndim = base.kernel.ndim - layout.stack
        meta = _adapter_shardings(base.kernel, layout)
        self.lora_a = LoraParam(a, **meta[0])
        self.lora_b = LoraParam(b, **meta[1])
        self.lora_scale = LoraScale(jnp.asarray(scale, jnp.float32), **meta[2])
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.merged = False

    def __getattr__(self, name: str) -> Any:
        # What the wrapper lacks is its base's: model code reads `self.o_proj.kernel.shape`, `.in_features`, ...
        base = vars(self).get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def _delta_kernel(self) -> jax.Array:
        kernel = self.base.kernel[...]
        layout = None if self.in_axes is None else KernelLayout(
            stack=kernel.ndim - self.own_ndim, n_in=len(self.in_axes), in_axes=self.in_axes)
        return delta_weight(self.lora_a[...], self.lora_b[...], self.lora_scale[...], kernel.shape, layout)

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        y = self.base(x, *args, **kwargs)
        if self.merged:
            return y
        h = self.dropout(x) if self.dropout is not None else x
        if isinstance(self.base, nnx.Einsum):
            return y + jnp.einsum(self.base.einsum_str, h.astype(y.dtype), self._delta_kernel().astype(y.dtype))
        if isinstance(self.base, nnx.LinearGeneral):
            axes = tuple(sorted(a % h.ndim for a in self.base.axis))
            h = jnp.moveaxis(h, axes, tuple(range(h.ndim - len(axes), h.ndim)))
            delta = lora_delta(h.astype(y.dtype), self.lora_a[...], self.lora_b[...], self.lora_scale[...], n_in=len(axes))
            return y + delta.reshape(y.shape)
        return y + lora_delta(h.astype(y.dtype), self.lora_a[...], self.lora_b[...], self.lora_scale[...])
