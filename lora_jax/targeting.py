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
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_LEAVES, LORA_SCALE, is_param_leaf, iter_leaves, path_key  # noqa: F401  (re-exported)

# The stacked expert tensors of MoE models live under a module named "experts" (HF's `mlp.experts`,
# `lora_jax.models.moe`): our key `model.layers.0.mlp.experts.gate_up_proj` is an HF *parameter*
# name, which PEFT adapts only through `target_parameters`, never through target_modules/all-linear.
PARAMETER_OWNER = "experts"

# Names of the output layer in the project's model families (used when the model is not given).
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output")

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft 0.21.2, peft/utils/constants.py):
# the target_modules PEFT uses when a LoraConfig names none. tests/test_peft_semantics.py checks it
# equals PEFT's own table.
DEFAULT_TARGET_MODULES: dict[str, Any] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"], "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


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


def resolve_targets(config: LoraConfig, model_type: str | None) -> LoraConfig:
    """`config` with `target_modules=None` replaced by PEFT's default for `model_type`.

    >>> resolve_targets(LoraConfig(), "gpt2").target_modules
    ('c_attn',)
    """
    if config.target_modules is not None or config.target_parameters:  # PEFT: parameters alone target no module
        return config
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"LoraConfig.target_modules is None and PEFT has no default for model_type {model_type!r}; "
                         "name the modules (e.g. target_modules=['q_proj', 'v_proj']) or 'all-linear'")
    return dataclasses.replace(config, target_modules=DEFAULT_TARGET_MODULES[model_type])


# transformers >= 5 fuses the experts of MoE models (Qwen3-MoE: `mlp.experts.gate_up_proj` / `down_proj`
# parameters, the router `mlp.gate` a custom module), so PEFT 0.21 rewrites target_modules that name the
# pre-fusion nn.Linear modules into target_parameters (peft/utils/transformers_weight_conversion.py,
# _convert_peft_config_moe): v4 name -> fused parameter; a fused pair needs both halves and gets rank and
# alpha doubled (same alpha/r) via a `.*\.gate_up_proj` pattern; the router becomes `gate.weight`.
MOE_V4_NAMES = {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
MOE_FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}
_EXPLICIT = ("list the targets instead, e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'], "
             "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']")


def convert_moe_targets(config: LoraConfig, names: Any) -> LoraConfig:
    """`config` as PEFT (with transformers >= 5) rewrites it for a model with fused MoE expert tensors:
    `names` are the model's PEFT module/parameter names; without expert tensors `config` is returned.

    A regex or "all-linear" is first resolved to leaf names, as PEFT does; LoRA on the router
    (PEFT's `gate.weight`), which lora_jax does not implement, is refused in one line.

    >>> names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate",
    ...          "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    >>> c = convert_moe_targets(LoraConfig(r=2, alpha=4, target_modules=["q_proj", "gate_proj", "up_proj"]), names)
    >>> c.target_modules, c.target_parameters, list(c.rank_pattern.values()), list(c.alpha_pattern.values())
    (('q_proj',), ('gate_up_proj',), [4], [8])
    """
    names = list(names)
    containers = sorted({n.rpartition(".")[0] for n in names if is_parameter_key(n)})
    targets = config.target_modules
    if not containers or targets is None or not targets:
        return config
    if targets == ALL_LINEAR:
        raise ValueError("target_modules='all-linear' on a mixture of experts: PEFT (transformers >= 5) then also adapts the "
                         f"expert tensors and the router (target_parameters gate.weight), which lora_jax cannot; {_EXPLICIT}")
    if isinstance(targets, str):  # PEFT resolves a regex to the leaf names it matches (v4 expert names probed)
        hit = lambda n: re.fullmatch(targets, n) and not (config.exclude_modules and _matches(config.exclude_modules, n))  # noqa: E731
        hits = {n.rsplit(".", 1)[-1] for n in names if hit(n)}
        hits |= {old for c in containers for old in MOE_V4_NAMES if old != "gate" and hit(f"{c}.{old}")}
        if not hits:
            return config
        targets = tuple(sorted(hits))
    mapped = {t: next((new for old, new in MOE_V4_NAMES.items() if t == old or t.endswith("." + old)), None) for t in targets}
    if not any(mapped.values()):
        return config if targets == config.target_modules else dataclasses.replace(config, target_modules=targets)
    if "gate.weight" in mapped.values():
        router = next(t for t, new in mapped.items() if new == "gate.weight")
        raise ValueError(f"target_modules names {router!r}, the MoE router: PEFT (transformers >= 5) adapts its weight "
                         "(target_parameters gate.weight), which lora_jax does not support; leave the router out")
    ranks, alphas = dict(config.rank_pattern), dict(config.alpha_pattern)
    for fused, parts in MOE_FUSED.items():
        present = {old for t, new in mapped.items() if new == fused for old in parts if t == old or t.endswith("." + old)}
        if present and present != set(parts):
            raise ValueError(f"Cannot convert PEFT target(s) {', '.join(sorted(present))} without also targeting "
                             f"{', '.join(sorted(set(parts) - present))} because they are fused into {fused} (PEFT's rule)")
        if present:
            ranks[rf".*\.{re.escape(fused)}"] = config.r * len(parts)
            alphas[rf".*\.{re.escape(fused)}"] = config.alpha * len(parts)
    params = tuple(sorted(set(config.target_parameters or ()) | {new for new in mapped.values() if new}))
    return dataclasses.replace(config, target_modules=tuple(t for t, new in mapped.items() if not new), target_parameters=params,
                               rank_pattern=ranks, alpha_pattern=alphas)


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


def is_target(config: LoraConfig, key: str, output_module: str | None = None) -> bool:
    """Whether the module named `key` (a PEFT module name) gets an adapter under `config` (PEFT's rules).

    >>> is_target(LoraConfig(target_modules=["q_proj"]), "model.layers.0.self_attn.q_proj")
    True
    >>> is_target(LoraConfig(target_parameters=["mlp.experts.down_proj"]), "model.layers.0.mlp.experts.down_proj")
    True
    """
    if is_parameter_key(key):  # PEFT's _inject_parameters: full name or '.'-suffix, no exclude_modules
        return bool(config.target_parameters) and any(key == t or key.endswith("." + t) for t in config.target_parameters)
    if config.target_modules is None and config.target_parameters:
        return False
    if config.exclude_modules and _matches(config.exclude_modules, key):
        return False
    if config.target_modules == ALL_LINEAR:
        return key != output_module and not (output_module is None and is_output_layer(key))
    if config.target_modules is None:
        raise ValueError("LoraConfig.target_modules is None; resolve it with lora_jax.targeting.resolve_targets(config, model_type)")
    if not _matches(config.target_modules, key):
        return False
    # PEFT checks layers_to_transform only for suffix matches: a list entry equal to the whole name adapts it.
    return isinstance(config.target_modules, str) or key in config.target_modules or config.layer_selected(key)


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
