"""`KernelLayout`: how a kernel's axes split into stacked layers, inputs and outputs (see `lora_jax.targeting`).

A plain Dense kernel [in, out] is `KernelLayout(0, 1)`; stacked over L layers [L, in, out] it is
`KernelLayout(1, 1)`. A kernel with more than two axes is never guessed (`default_layout`): it is a
stack only inside the project's layer containers; elsewhere `Layouts` (from
`lora_jax.kernel_layouts(model, x)`) must give it.

>>> default_layout((2, 4, 8), "model.layers.mlp.up_proj").split((2, 4, 8))
((2,), (4,), (8,))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lora_jax.target_rules import is_parameter_key


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's axes split: `stack` leading layer axes, then its own axes: `n_in` input axes
    (the leading ones, or the positions `in_axes` among its own axes, e.g. an `nn.Einsum` such as
    "btd,hdk->bthk" contracting its middle axis), the rest outputs.

    A is [*stack, prod(inputs), r] and B [*stack, r, prod(outputs)], inputs and outputs each in
    kernel order; `to_kernel` puts ΔW back in the kernel's own axis order.

    >>> KernelLayout(stack=1, n_in=1).split((4, 16, 32))
    ((4,), (16,), (32,))
    >>> KernelLayout(n_in=1, in_axes=(1,)).split((2, 8, 3))
    ((), (8,), (2, 3))
    """

    stack: int = 0
    n_in: int = 1
    in_axes: tuple[int, ...] | None = None  # None: the first n_in of the kernel's own axes

    def __post_init__(self):
        if self.stack < 0 or self.n_in < 1:
            raise ValueError(f"KernelLayout needs stack >= 0 and n_in >= 1, got {self}")
        if self.in_axes is not None:
            axes = tuple(int(a) for a in self.in_axes)
            if len(axes) != self.n_in or len(set(axes)) != len(axes) or min(axes) < 0 or list(axes) != sorted(axes):
                raise ValueError(f"KernelLayout.in_axes must be n_in distinct increasing axis positions, got {self}")
            object.__setattr__(self, "in_axes", None if axes == tuple(range(self.n_in)) else axes)

    def __repr__(self) -> str:
        extra = "" if self.in_axes is None else f", in_axes={self.in_axes}"
        return f"KernelLayout(stack={self.stack}, n_in={self.n_in}{extra})"

    def own_axes(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input axes, output axes) as absolute positions in a kernel of `ndim` axes."""
        own = ndim - self.stack
        ins = tuple(range(self.n_in)) if self.in_axes is None else self.in_axes
        if own < self.n_in + 1 or max(ins) >= own:
            raise ValueError(f"a kernel of {ndim} axes has too few axes for {self}")
        return tuple(self.stack + a for a in ins), tuple(self.stack + a for a in range(own) if a not in ins)

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        ins, outs = self.own_axes(len(shape))
        return tuple(shape[: self.stack]), tuple(shape[a] for a in ins), tuple(shape[a] for a in outs)

    def to_kernel(self, dw: Any, shape: tuple[int, ...]) -> Any:
        """ΔW [*stack, prod(in), prod(out)] -> the kernel's shape and axis order.

        >>> import numpy as np
        >>> KernelLayout(n_in=1, in_axes=(1,)).to_kernel(np.arange(48).reshape(8, 6), (2, 8, 3)).shape
        (2, 8, 3)
        """
        stack, ins, outs = self.split(shape)
        dw = dw.reshape(stack + ins + outs)
        if self.in_axes is None:
            return dw
        in_pos, out_pos = self.own_axes(len(shape))
        order = tuple(range(self.stack)) + in_pos + out_pos  # where each axis of dw goes in the kernel
        return dw.transpose(tuple(order.index(a) for a in range(len(shape))))


def einsum_in_axes(equation: str) -> tuple[int, ...]:
    """Positions among an Einsum kernel's axes of those it contracts with the input (in the input,
    not in the output): LoRA's A spans these, B the others.

    >>> einsum_in_axes("btd,hdk->bthk"), einsum_in_axes("...d,dhk->...hk")
    ((1,), (0,))
    """
    inputs, out_sub = equation.replace(" ", "").split("->")
    x_sub, k_sub = inputs.split(",")
    k_sub = k_sub.replace("...", "")
    return tuple(i for i, c in enumerate(k_sub) if c in x_sub and c not in out_sub)


class Layouts(dict):
    """module key -> KernelLayout, plus what tracing the model told: `output_module` (the module
    key of the model's output layer, or None when no dense module produces the output).

    >>> Layouts({"q": KernelLayout()}, output_module="head").output_module
    'head'
    """

    def __init__(self, *args, output_module: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_module = output_module
        self.refused: dict[str, str] = {}  # module key -> why its kernel cannot take an adapter (raised if targeted)
        self.not_linear: set[str] = set()  # modules with a kernel that are no linear layer (convolutions): not all-linear's


def _layer_containers() -> tuple[tuple[str, str], ...]:
    from lora_jax.models.naming import LAYER_CONTAINERS  # the models import this module: import late

    return LAYER_CONTAINERS


def stack_container(key: str) -> str | None:
    """The layer container ("model.layers", "transformer.h") a stacked (scan_layers) module key
    lives in, or None (not in one, or already naming a layer index).

    >>> stack_container("model.layers.self_attn.q_proj"), stack_container("model.layers.0.self_attn.q_proj")
    ('model.layers', None)
    """
    for outer, inner in _layer_containers():
        prefix = f"{outer}.{inner}."
        if key.startswith(prefix) and not key[len(prefix):].split(".")[0].isdigit():
            return prefix[:-1]
    return None


def _in_project_tree(params: Any) -> bool:
    return any(isinstance(params, Mapping) and isinstance(params.get(o), Mapping) and inner in params[o]
               for o, inner in _layer_containers())


def default_layout(shape: tuple[int, ...], key: str = "") -> KernelLayout:
    """[in, out] -> plain Dense; [L, (E,) in, out] inside a project layer container (scanned layers,
    MoE experts) -> stacked Dense; any other kernel of more than two axes is ambiguous and refused
    (one line naming the fix).

    >>> default_layout((4, 8)), default_layout((2, 4, 8), "model.layers.mlp.up_proj")
    (KernelLayout(stack=0, n_in=1), KernelLayout(stack=1, n_in=1))
    """
    if len(shape) <= 2:
        return KernelLayout(stack=0, n_in=1)
    in_container = any(key.startswith(f"{o}.{i}.") for o, i in _layer_containers())
    if in_container or is_parameter_key(key):  # project models: scanned layers and/or MoE experts lead
        return KernelLayout(stack=len(shape) - 2, n_in=1)
    raise ValueError(
        f"kernel {key!r} has shape {tuple(shape)}: its axes could be stacked layers or DenseGeneral/Einsum input/output "
        "axes; pass layouts=lora_jax.kernel_layouts(model, sample_input) (or {key: KernelLayout(stack, n_in)})"
    )
