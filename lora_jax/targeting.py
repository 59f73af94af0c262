"""Which kernels a `LoraConfig` targets: module keys, layouts and PEFT's matching rules.

A *module key* is the dotted path of the module that owns a `kernel` leaf, e.g. the leaf at
`params['model']['layers']['0']['self_attn']['q_proj']['kernel']` belongs to the module key
`model.layers.0.self_attn.q_proj` — exactly the name PyTorch/PEFT give that module, because the
project's models name their submodules after Hugging Face's. `target_modules` and
`exclude_modules` are matched against module keys with PEFT's rules: a list matches the key itself
or a `.`-separated suffix of it, a single string is a regex full-matched against the key.

A *kernel layout* says how a kernel's axes split: `stack` leading axes (layers stacked by
`nn.scan`), then `n_in` input axes, then the output axes. A plain Dense kernel [in, out] is
`KernelLayout(0, 1)`; the same kernel stacked over L layers [L, in, out] is `KernelLayout(1, 1)`,
the default for any kernel of more than two axes. DenseGeneral/Einsum kernels with several input
axes need their exact layouts: `lora_jax.kernel_layouts(model, *args)` finds them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_LEAVES, LORA_SCALE, iter_leaves, path_key  # noqa: F401  (re-exported)

# The stacked expert tensors of MoE models live under a module named "experts" (HF's `mlp.experts`,
# `lora_jax.models.moe`): our key `model.layers.0.mlp.experts.gate_up_proj` is an HF *parameter*
# name, which PEFT adapts only through `target_parameters`, never through target_modules/all-linear.
PARAMETER_OWNER = "experts"

# Modules `all-linear` leaves alone, as PEFT does: the output layer (and embeddings, which are
# `embedding` leaves, not kernels).
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output")


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a kernel's axes split: `stack` leading layer axes, `n_in` input axes, then outputs.

    >>> KernelLayout(stack=1, n_in=1).split((4, 16, 32))
    ((4,), (16,), (32,))
    """

    stack: int = 0
    n_in: int = 1

    def __post_init__(self):
        if self.stack < 0 or self.n_in < 1:
            raise ValueError(f"KernelLayout needs stack >= 0 and n_in >= 1, got {self}")

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if len(shape) < self.stack + self.n_in + 1:
            raise ValueError(f"kernel of shape {shape} has too few axes for {self}")
        s, i = self.stack, self.stack + self.n_in
        return tuple(shape[:s]), tuple(shape[s:i]), tuple(shape[i:])


def default_layout(shape: tuple[int, ...]) -> KernelLayout:
    """[in, out] -> no stack; [L..., in, out] -> stacked Dense (what `nn.scan` over Dense gives)."""
    return KernelLayout(stack=max(len(shape) - 2, 0), n_in=1)


def module_key(path: tuple[str, ...]) -> str:
    """Dotted module key of a leaf path: ('model', 'q_proj', 'kernel') -> 'model.q_proj'."""
    return ".".join(path[:-1])


def kernel_paths(params: Any) -> list[tuple[str, ...]]:
    """Paths of every `kernel` leaf, in tree order."""
    return [p for p, _ in iter_leaves(params) if p[-1] == KERNEL]


def _matches(spec: str | tuple[str, ...], key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + name) for name in spec)


def is_output_layer(key: str) -> bool:
    return key.split(".")[-1] in OUTPUT_LAYER_NAMES


def is_parameter_key(key: str) -> bool:
    """Whether `key` names an HF parameter (a stacked MoE expert tensor), not a module.

    >>> is_parameter_key("model.layers.0.mlp.experts.down_proj"), is_parameter_key("model.layers.0.mlp.down_proj")
    (True, False)
    """
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == PARAMETER_OWNER


def is_target(config: LoraConfig, key: str) -> bool:
    """Whether the module at `key` gets an adapter under `config` (PEFT's rules).

    >>> is_target(LoraConfig(target_modules=["q_proj"]), "model.layers.0.self_attn.q_proj")
    True
    >>> is_target(LoraConfig(target_parameters=["mlp.experts.down_proj"]), "model.layers.0.mlp.experts.down_proj")
    True
    """
    if is_parameter_key(key):  # PEFT's _inject_parameters: full name or '.'-suffix, no exclude_modules
        return bool(config.target_parameters) and any(key == t or key.endswith("." + t) for t in config.target_parameters)
    if config.target_modules is None:
        return False
    if config.exclude_modules and _matches(config.exclude_modules, key):
        return False
    if config.target_modules == ALL_LINEAR:
        return not is_output_layer(key)
    return _matches(config.target_modules, key)


def select_targets(params: Any, config: LoraConfig) -> list[tuple[str, ...]]:
    """Kernel paths `config` targets; a clear error when nothing matches or a pattern hits a non-kernel.

    >>> import jax
    >>> params = {"q_proj": {"kernel": jax.numpy.zeros((4, 4))}}
    >>> select_targets(params, LoraConfig(target_modules=["q_proj"]))
    [('q_proj', 'kernel')]
    """
    leaves = list(iter_leaves(params))
    kernels = [p for p, _ in leaves if p[-1] == KERNEL]
    targets = [p for p in kernels if is_target(config, module_key(p))]
    if config.target_modules not in (ALL_LINEAR, None):
        # A pattern that names a non-kernel leaf (a bias, a norm scale) or a module without a kernel
        # (an embedding) would silently adapt nothing there: refuse it.
        kernel_modules = {module_key(p) for p in kernels}
        for p, _ in leaves:
            names_leaf = not isinstance(config.target_modules, str) and _matches(config.target_modules, ".".join(p))
            names_module = module_key(p) not in kernel_modules and _matches(config.target_modules, module_key(p))
            if p[-1] != KERNEL and (names_leaf or names_module):
                raise ValueError(
                    f"target_modules={config.target_modules!r} matches {'.'.join(p)!r}, which is not a dense kernel; "
                    "LoRA adapts modules that own a 'kernel' (e.g. 'q_proj'): narrow the pattern"
                )
    if not targets:
        shown = sorted({module_key(p) for p in kernels})
        more = f" (and {len(shown) - 30} more)" if len(shown) > 30 else ""
        raise ValueError(
            f"LoraConfig.target_modules={config.target_modules!r} / target_parameters={config.target_parameters!r} "
            "matched no kernel; modules with kernels are: "
            f"{', '.join(shown[:30])}{more}"
        )
    return targets


def resolve_layout(path: tuple[str, ...], shape: tuple[int, ...], layouts: Mapping[str, KernelLayout] | None) -> KernelLayout:
    """Layout of the kernel at `path`: the one `layouts` gives for its module key, else the default."""
    if layouts and module_key(path) in layouts:
        return layouts[module_key(path)]
    return default_layout(shape)
