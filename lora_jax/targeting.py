"""Which kernels a `LoraConfig` targets: module keys, layouts and PEFT's matching rules.

A *module key* is the dotted path of the module that owns a `kernel` leaf, e.g. the leaf at
`params['model']['layers']['0']['self_attn']['q_proj']['kernel']` belongs to the module key
`model.layers.0.self_attn.q_proj` — exactly the name PyTorch/PEFT give that module, because the
project's models name their submodules after Hugging Face's. A kernel stacked over layers by
`nn.scan` (`model.layers.self_attn.q_proj`, [L, in, out]) stands for L PEFT modules
`model.layers.{i}.self_attn.q_proj`; matching is always done on those PEFT names, layer by layer,
so `layers_to_transform`, per-layer `rank_pattern`/`alpha_pattern` and regexes naming one layer
mean what they mean in PEFT (`plan_targets` gives each stacked kernel a rank and alpha per layer).

Matching (PEFT's `check_target_module_exists`): `exclude_modules` first; a list matches the name
itself or a `.`-separated suffix of it, a single string is a regex full-matched against the name;
`layers_to_transform` then keeps only the listed layer indices. A name a pattern matches must own
a dense kernel: matching a module without one (an attention block, a norm, an embedding, a layer
container) is an error, as PEFT raises "Target module ... is not supported".

`"all-linear"` adapts every dense kernel except the model's *output layer*. Which module that is
comes from the model when it is known: `kernel_layouts(model, x)` records the module whose output is
the model's output (or, when the model post-processes it without changing its shape, the last
dense module called). Without the model, a kernel named `lm_head` / `embed_out` / `output` is
the output layer in trees of the project's models (whose layers live under `model.layers` or
`transformer.h`); for any other param tree `all-linear` needs `layouts=` and says so.

A *kernel layout* says how a kernel's axes split: `stack` leading axes (layers stacked by
`nn.scan`), then `n_in` input axes, then the output axes. A plain Dense kernel [in, out] is
`KernelLayout(0, 1)`; stacked over L layers [L, in, out] it is `KernelLayout(1, 1)`. A kernel with
more than two axes is never guessed: it is a stack only inside the project's layer containers;
elsewhere (DenseGeneral / Einsum / scanned user models) `layouts=lora_jax.kernel_layouts(model, x)`
must give it, and `inject` says so, naming the module.

Files: target_rules.py (PEFT's matching rules on names), kernel_layout.py (kernel layouts),
moe_targets.py (PEFT's MoE target rewrite); this module applies them to param trees and
re-exports their names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.kernel_layout import (KernelLayout, Layouts, _in_project_tree, _layer_containers,  # noqa: F401  (re-exported)
                                    default_layout, einsum_in_axes, stack_container)
from lora_jax.moe_targets import MOE_FUSED, MOE_V4_NAMES, convert_moe_targets  # noqa: F401  (re-exported)
from lora_jax.target_rules import (DEFAULT_TARGET_MODULES, OUTPUT_LAYER_NAMES, PARAMETER_OWNER, _matches,  # noqa: F401  (re-exported)
                                   is_output_layer, is_parameter_key, is_target, resolve_targets)
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_LEAVES, LORA_SCALE, is_param_leaf, iter_leaves, path_key  # noqa: F401  (re-exported)


def module_key(path: tuple[str, ...]) -> str:
    """Dotted module key of a leaf path: ('model', 'q_proj', 'kernel') -> 'model.q_proj'."""
    return ".".join(path[:-1])


def kernel_paths(params: Any) -> list[tuple[str, ...]]:
    """Paths of every `kernel` leaf, in tree order."""
    return [p for p, _ in iter_leaves(params) if p[-1] == KERNEL]


def _guess_model_type(params: Any) -> str | None:
    """The project's families from their trees: 'transformer.h' is GPT-2, 'model.layers' is
    Llama-like (every such family shares PEFT's default, q_proj/v_proj)."""
    if isinstance(params, Mapping) and isinstance(params.get("transformer"), Mapping) and "h" in params["transformer"]:
        return "gpt2"
    if any(PARAMETER_OWNER in path for path, _ in iter_leaves(params)):
        return None  # a mixture of experts: PEFT's table has no entry for most; ask for model_type
    if isinstance(params, Mapping) and isinstance(params.get("model"), Mapping) and "layers" in params["model"]:
        return "llama"
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """One targeted kernel: its path, layout, and per PEFT module (one per stacked layer) the PEFT
    name, rank and alpha; rank 0 = that layer is not adapted."""

    path: tuple[str, ...]
    layout: KernelLayout
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def uniform(self) -> bool:
        """One rank and one alpha for every layer, none skipped: no per-layer bookkeeping needed."""
        return len(set(self.ranks)) == 1 and len(set(self.alphas)) == 1 and self.ranks[0] > 0


def _nodes(tree: Any, prefix: tuple[str, ...] = ()):
    """(path, node) of every dict node below the root; leaves are not nodes."""
    for k, v in tree.items():
        path = prefix + (str(k),)
        if isinstance(v, Mapping):
            yield path, v
            yield from _nodes(v, path)


def _peft_names(key: str, n_layers: int | None) -> list[str]:
    """PEFT module names a node of our tree stands for (stacked nodes: one per layer)."""
    container = stack_container(key)
    if container is None or n_layers is None:
        return [key]
    rest = key[len(container) + 1:]
    return [f"{container}.{i}.{rest}" for i in range(n_layers)]


def module_names(params: Any) -> list[str]:
    """PEFT names of every module (dict node) of the tree, a stacked (scan_layers) one once per layer.

    >>> import numpy as np
    >>> module_names({"model": {"layers": {"mlp": {"up_proj": {"kernel": np.zeros((2, 4, 8))}}}}})[-2:]
    ['model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj']
    """
    n_layers = _stack_depth(params)
    return [n for path, _ in _nodes(params) for n in _peft_names(".".join(path), n_layers)]


def _stack_depth(params: Any) -> int | None:
    for o, inner in _layer_containers():
        node = params.get(o, {}).get(inner) if isinstance(params, Mapping) and isinstance(params.get(o), Mapping) else None
        if isinstance(node, Mapping) and node and not any(str(k).isdigit() for k in node):
            for _, leaf in iter_leaves(node):
                return int(leaf.shape[0])
    return None


def _check_module_matches(params: Any, config: LoraConfig, n_layers: int | None) -> None:
    """PEFT raises when a target pattern matches a module it cannot adapt: so do we. A tied LM head
    (no `lm_head` kernel in a project model's tree) PEFT adapts as a Linear sharing the embedding;
    lora_jax does not, so naming it is an error rather than silently skipped."""
    if config.target_modules in (ALL_LINEAR, None):
        return
    if _in_project_tree(params) and not isinstance(params.get("lm_head"), Mapping) and is_target(config, "lm_head"):
        raise ValueError(f"target_modules={config.target_modules!r} names 'lm_head', which this model ties to the embedding "
                         "(no linear layer of its own); LoRA on a tied LM head is not supported: leave it out")
    for path, node in _nodes(params):
        if KERNEL in node:
            continue
        key = ".".join(path)
        names = _peft_names(key, n_layers)
        if n_layers is not None and stack_container(key + ".x") == key:  # a stacked layer container: the list and its layers
            names = [key] + [f"{key}.{i}" for i in range(n_layers)]
        hit = next((n for n in names if is_target(config, n)), None)
        if hit is not None and "embedding" in node:  # flax's Embed param; PEFT has lora.Embedding, lora_jax has not
            raise ValueError(f"target_modules={config.target_modules!r} matches the embedding {hit!r}: LoRA on embeddings "
                             "(PEFT's lora.Embedding) is not supported by lora_jax; leave it out of target_modules")
        if hit is not None:
            holds = sorted(str(k) for k in node)
            raise ValueError(f"target_modules={config.target_modules!r} matches module {hit!r}, which is not a dense kernel (it "
                             f"holds: {', '.join(holds[:6])}{', ...' if len(holds) > 6 else ''}); PEFT refuses such a target "
                             "too: narrow the pattern to modules that own a 'kernel' (e.g. 'q_proj')")
    for path, _ in iter_leaves(params):
        if path[-1] != KERNEL and not isinstance(config.target_modules, str) and _matches(config.target_modules, ".".join(path)):
            raise ValueError(f"target_modules={config.target_modules!r} matches {'.'.join(path)!r}, which is not a dense kernel; "
                             "LoRA adapts modules that own a 'kernel' (e.g. 'q_proj'): narrow the pattern")


def plan_targets(params: Any, config: LoraConfig, layouts: Mapping[str, KernelLayout] | None = None,
                 model_type: str | None = None) -> list[Target]:
    """Every kernel `config` adapts, with its layout and per-layer PEFT names, ranks and alphas.

    Raises (one line) when nothing matches, when a pattern names a module without a kernel, when
    a kernel's layout is ambiguous, and for `all-linear` on a tree whose output layer is unknown.

    >>> import jax.numpy as jnp
    >>> params = {"model": {"layers": {"mlp": {"up_proj": {"kernel": jnp.zeros((2, 4, 8))}}}}}
    >>> t, = plan_targets(params, LoraConfig(target_modules=["up_proj"], rank_pattern={"layers.1.mlp.up_proj": 2}))
    >>> t.names, t.ranks
    (('model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj'), (8, 2))
    """
    if config.target_modules is None:
        config = resolve_targets(config, model_type or _guess_model_type(params))
    output_module = getattr(layouts, "output_module", None)
    if config.target_modules == ALL_LINEAR and not isinstance(layouts, Layouts) and not _in_project_tree(params):
        raise ValueError("target_modules='all-linear' must leave out the model's output layer, which a param tree alone does "
                         "not show; pass layouts=lora_jax.kernel_layouts(model, sample_input) to inject")
    n_layers = _stack_depth(params)
    config = convert_moe_targets(config, module_names(params))
    _check_module_matches(params, config, n_layers)
    plans, kernels = [], []
    for path, kernel in iter_leaves(params):
        if path[-1] != KERNEL:
            continue
        key = module_key(path)
        kernels.append(key)
        if config.target_modules == ALL_LINEAR and key in getattr(layouts, "not_linear", ()):
            continue  # PEFT's all-linear takes nn.Linear only (no Conv)
        try:
            layout = resolve_layout(path, tuple(kernel.shape), layouts)
        except ValueError:
            if is_target(config, key, output_module):  # ambiguous and wanted: say so; else not our business
                raise
            continue
        stack = tuple(kernel.shape[: layout.stack])
        n = math.prod(stack)
        names = _peft_names(key, stack[0] if layout.stack == 1 else None)
        if len(names) != n:  # a stack we cannot name per layer: every layer answers to the key itself
            names = [key] * n
        hits = [is_target(config, name, output_module) for name in names]
        if not any(hits):
            if (layout.stack and len(set(names)) != len(names) and config.layers_to_transform is not None
                    and is_target(dataclasses.replace(config, layers_to_transform=None, layers_pattern=None), key)):
                raise ValueError(f"layers_to_transform cannot pick layers of {key!r}: a kernel stacked {stack} by a scan/vmap "
                                 "outside the project's layer containers has no per-layer PEFT names; adapt all its layers "
                                 "(drop layers_to_transform) or build the layers unstacked")
            continue
        ranks = tuple(config.rank_for(nm) if hit else 0 for nm, hit in zip(names, hits))
        alphas = tuple(config.alpha_for(nm) if hit else 0.0 for nm, hit in zip(names, hits))
        target = Target(path, layout, tuple(names), ranks, alphas)
        if not target.uniform and (layout.stack > 1 or len(set(names)) != len(names)):
            raise ValueError(f"LoraConfig gives the layers stacked in {key!r} different ranks/alphas or skips some, but their "
                             "PEFT names are unknown (not a project layer container); use one rank for all its layers")
        plans.append(target)
    if not plans:
        shown = sorted(set(kernels))
        more = f" (and {len(shown) - 30} more)" if len(shown) > 30 else ""
        raise ValueError(
            f"LoraConfig.target_modules={config.target_modules!r} / target_parameters={config.target_parameters!r} "
            "matched no kernel; modules with kernels are: "
            f"{', '.join(shown[:30])}{more}"
        )
    return plans


def select_targets(params: Any, config: LoraConfig, layouts: Mapping[str, KernelLayout] | None = None,
                   model_type: str | None = None) -> list[tuple[str, ...]]:
    """Kernel paths `config` targets (in at least one layer); see `plan_targets` for the errors.

    >>> import jax
    >>> params = {"q_proj": {"kernel": jax.numpy.zeros((4, 4))}}
    >>> select_targets(params, LoraConfig(target_modules=["q_proj"]))
    [('q_proj', 'kernel')]
    """
    return [t.path for t in plan_targets(params, config, layouts, model_type)]


def resolve_layout(path: tuple[str, ...], shape: tuple[int, ...], layouts: Mapping[str, KernelLayout] | None) -> KernelLayout:
    """Layout of the kernel at `path`: the one `layouts` gives for its module key, else `default_layout`."""
    if module_key(path) in getattr(layouts, "refused", {}):
        raise ValueError(layouts.refused[module_key(path)])
    if layouts and module_key(path) in layouts:
        return layouts[module_key(path)]
    return default_layout(shape, module_key(path))
