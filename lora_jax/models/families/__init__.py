"""The model-family registry: everything lora_jax knows about one architecture, declared in one place.

Each family module (`llama.py`, `gpt2.py`, `gemma.py`, `qwen3_moe.py`) defines its Flax modules and
ends with one `Family(...)` declaration: the causal-LM class, the HF `model_type`s it serves and how
it reads their transformers config, where its blocks and embedding live in the param tree, how its
tensors are named in HF checkpoints (GPT-2's untransposed Conv1D, fused MoE expert tensors), its
default partition rules, the parameters PEFT adapts with `target_parameters`, and its GGUF mapping.
`build_model`, `lora_jax.models.naming`, `lora_jax.sharding.default_rules`, the PEFT interop and the
train step's fused loss (`lora_jax.models.build.lm_head`) look families up here; adding a family is
one new module listed in `_MODULES` (and its tests).

>>> for_model_type("qwen2").name, for_model_type("gpt2").layers
('llama', ('transformer', 'h'))
>>> sorted(f.name for f in families())
['gemma', 'gpt2', 'llama', 'qwen3_moe']
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Sequence

_MODULES = ("llama", "gpt2", "gemma", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class TensorCodec:
    """How one of our leaves is stored in HF checkpoints when it is not a single `<module>.weight`.

    `names(hf_module, cfg)` lists the HF tensor names (in order), `join(arrays, cfg)` builds our leaf
    from them (numpy), `split(leaf, cfg)` gives them back (numpy, same order).
    """

    names: Callable[[str, Any], list[str]]
    join: Callable[[list[Any], Any], Any]
    split: Callable[[Any, Any], list[Any]]


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family (see the module docstring)."""

    name: str
    causal_lm: type  # the flax module class; constructed as cls(cfg, dtype, param_dtype, lora, scan_layers, remat, attention)
    model_types: tuple[str, ...]
    config_from_hf: Callable[[Any], Any]  # transformers config -> ModelConfig
    layers: tuple[str, str]  # the block container in the param tree (HF's ModuleList)
    embedding: tuple[str, ...]  # the token embedding module (the tied LM head reads its 'embedding')
    rules: Sequence[tuple[str, Any]]  # default partition rules (lora_jax.sharding.rules)
    conv1d: tuple[str, ...] = ()  # module names whose HF weight is stored [in, out] (GPT-2 Conv1D)
    codecs: tuple[tuple[str, TensorCodec], ...] = ()  # (module-name suffix, codec) for multi-tensor leaves
    # PEFT `target_parameters`: (module-name suffix holding them, parameter names in the HF module's
    # declaration order — the order PEFT nests its ParamWrappers in).
    peft_parameters: tuple[str, tuple[str, ...]] | None = None
    ignored_suffixes: tuple[str, ...] = ()  # checkpoint tensors with no param (buffers, tied copies)
    gguf: Any = None  # lora_jax.models.gguf.GGUFMapping or None

    def codec(self, module_key: str) -> TensorCodec | None:
        """The codec for the leaf of `module_key`, if its HF form is not one `<module>.weight`."""
        for suffix, codec in self.codecs:
            if module_key == suffix or module_key.endswith("." + suffix):
                return codec
        return None

    def is_parameter_module(self, module_key: str) -> bool:
        """Whether `module_key` stands for an HF *parameter* (PEFT `target_parameters`), not a module.

        >>> for_model_type("qwen3_moe").is_parameter_module("model.layers.0.mlp.experts.down_proj")
        True
        """
        if self.peft_parameters is None:
            return False
        owner, names = self.peft_parameters
        parent, _, leaf = module_key.rpartition(".")
        return leaf in names and (parent == owner or parent.endswith("." + owner))


def families() -> list[Family]:
    """Every registered family."""
    return [importlib.import_module(f"{__name__}.{m}").FAMILY for m in _MODULES]


def model_types() -> tuple[str, ...]:
    """Every HF model_type some family serves."""
    return tuple(t for f in families() for t in f.model_types)


def for_model_type(model_type: str) -> Family:
    """The family serving an HF `model_type` (ValueError naming the supported ones otherwise)."""
    for f in families():
        if model_type in f.model_types:
            return f
    raise ValueError(f"unsupported architecture model_type={model_type!r}; supported model types: {', '.join(model_types())}")


def of(cfg: Any) -> Family:
    """The family of a `ModelConfig`."""
    return for_model_type(cfg.model_type)


def for_name(name: str) -> Family:
    """A family by its name or one of its model_types ('llama', 'gemma2', 'gpt2', ...)."""
    key = name.lower().replace("-", "_")
    for f in families():
        if key == f.name or key in f.model_types:
            return f
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(f.name for f in families()))}")


def layer_containers() -> tuple[tuple[str, str], ...]:
    """The distinct block containers of all families (('model', 'layers'), ('transformer', 'h'))."""
    out: list[tuple[str, str]] = []
    for f in families():
        if f.layers not in out:
            out.append(f.layers)
    return tuple(out)
