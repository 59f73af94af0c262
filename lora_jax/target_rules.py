"""PEFT's rules for which module a `LoraConfig` targets, on PEFT module names (`check_target_module_exists`).

`exclude_modules` first; a list matches the name itself or a `.`-separated suffix of it, a single
string is a regex full-matched against the name; `layers_to_transform` then keeps only the listed
layer indices. `"all-linear"` takes every module except the model's output layer; `None` is
PEFT's per-architecture default (`resolve_targets`). Names of MoE expert tensors (under
`experts`) are HF *parameters*, matched by `target_parameters` only. Applying these rules to a
param tree (stacked layers, layouts, errors for bad matches) is `lora_jax.targeting`'s job.

>>> is_target(LoraConfig(target_modules=["q_proj"], exclude_modules=["layers.1.self_attn.q_proj"]),
...           "model.layers.1.self_attn.q_proj")
False
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from lora_jax.config import ALL_LINEAR, LoraConfig

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
