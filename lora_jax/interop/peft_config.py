"""PEFT's `adapter_config.json`: the full dict PEFT writes, and what we accept when reading one.

Written: every key `peft.LoraConfig(...).to_dict()` has (PEFT 0.21), with PEFT's defaults for the
features we do not implement and our config's values for the rest:

    peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout, target_modules,
    exclude_modules, rank_pattern, alpha_pattern, use_rslora, init_lora_weights,
    fan_in_fan_out (True for GPT-2's Conv1D), bias "none", base_model_name_or_path,
    inference_mode true, ... (use_dora false, modules_to_save null, ...)

Read: the LoRA options above map onto `LoraConfig`; metadata keys are ignored; any feature that
changes the model's output and that we do not implement (LoRA biases, modules_to_save,
PiSSA-style inits that rewrite the base weights, ...) is refused with a
one-line ValueError naming it, as is any unknown key with a non-empty value.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from lora_jax.config import LoraConfig
from lora_jax.files import read_json

PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose adapter_config.json layout we write

# PEFT 0.21's LoraConfig().to_dict() defaults (task_type/inference_mode as a saved adapter has them).
PEFT_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}

# Keys we read into LoraConfig (or check separately).
_HANDLED = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
            "alpha_pattern", "use_rslora", "init_lora_weights", "peft_type", "task_type", "fan_in_fan_out",
            "layers_to_transform", "layers_pattern", "use_dora",
            "target_parameters"}  # LoRA on MoE expert tensors (lora_jax.models.moe)
# Metadata, or options that only matter while initialising/training and not for the loaded weights.
_IGNORED = {"auto_mapping", "base_model_name_or_path", "revision", "peft_version", "inference_mode",
            "megatron_core", "qalora_group_size", "loftq_config", "eva_config", "corda_config",
            "lora_ga_config", "ensure_weight_tying", "runtime_config"}  # runtime_config: PEFT's runtime-only options
# Features that change the adapted model and that lora_jax does not implement: value must be "off".
_UNSUPPORTED = {
    "bias": "trained biases (bias != 'none')", "lora_bias": "LoRA biases (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)", "layer_replication": "layer_replication",
    "use_qalora": "QALoRA (use_qalora)", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "BD-LoRA (use_bdlora)", "arrow_config": "Arrow routing (arrow_config)", "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)", "monteclora_config": "MonteCLoRA (monteclora_config)",
}
_OK_INITS = (True, False, "gaussian", "eva", "orthogonal")  # none of these touches the base weights


def _is_off(key: str, value: Any) -> bool:
    if key == "bias":
        return value in (None, "none")
    return value in (None, False, "", [], {}, ())


def peft_config_dict(lora_config: LoraConfig, *, fan_in_fan_out: bool = False,
                     base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The complete adapter_config.json dict for `lora_config`, keys sorted as PEFT writes them.

    >>> d = peft_config_dict(LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    >>> d["peft_type"], d["task_type"], d["r"], d["lora_alpha"], d["target_modules"], d["use_dora"]
    ('LORA', 'CAUSAL_LM', 4, 8.0, ['q_proj'], False)
    """
    out = dict(PEFT_DEFAULTS)
    out.update(lora_config.to_peft_dict())
    out["fan_in_fan_out"] = bool(fan_in_fan_out)
    out["base_model_name_or_path"] = base_model_name_or_path
    return dict(sorted(out.items()))


def lora_config_from_peft(d: Mapping[str, Any], source: str = "adapter_config.json") -> LoraConfig:
    """A `LoraConfig` from a PEFT adapter_config.json dict, refusing what we cannot reproduce.

    >>> lora_config_from_peft({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}).alpha
    8
    >>> lora_config_from_peft({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "lora_bias": True})
    Traceback (most recent call last):
    ...
    ValueError: adapter_config.json uses LoRA biases (lora_bias), which lora_jax does not support; use a plain LoRA adapter
    """
    peft_type = d.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{source} has peft_type={peft_type!r}; lora_jax loads only LoRA adapters (peft_type 'LORA')")
    if d.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{source} has task_type={d.get('task_type')!r}; lora_jax loads causal-LM adapters only (task_type 'CAUSAL_LM')")
    for key, value in d.items():
        if key in _HANDLED or key in _IGNORED:
            continue
        if key in _UNSUPPORTED:
            if not _is_off(key, value):
                raise ValueError(f"{source} uses {_UNSUPPORTED[key]}, which lora_jax does not support; use a plain LoRA adapter")
        elif not _is_off(key, value):
            raise ValueError(f"{source} sets {key}={value!r}, an option lora_jax does not know; it may change the "
                             "adapter's output, so it is refused (remove it if it is only metadata)")
    init = d.get("init_lora_weights", True)
    if init not in _OK_INITS:
        raise ValueError(f"{source} has init_lora_weights={init!r}, which rewrites the base weights; convert it to "
                         "a plain LoRA adapter with PEFT first (see PEFT's PiSSA/OLoRA conversion docs)")
    if not d.get("target_modules") and not d.get("target_parameters"):
        raise ValueError(f"{source} has no target_modules; lora_jax loads adapters of linear modules only")
    try:
        return LoraConfig.from_peft_dict(d)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def write_peft_config(lora_config: LoraConfig, save_directory: str) -> None:
    """Write `save_directory/adapter_config.json` for `lora_config` alone (`LoraConfig.save_pretrained`).

    >>> import tempfile
    >>> d = tempfile.mkdtemp(); write_peft_config(LoraConfig(r=4, target_modules=["q_proj"]), d); os.listdir(d)
    ['adapter_config.json']
    """
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, "adapter_config.json"), "w") as f:
        json.dump(lora_config.to_dict(), f, indent=2)
        f.write("\n")


def read_peft_config(adapter_dir: str) -> LoraConfig:
    """The `LoraConfig` in `adapter_dir/adapter_config.json`, refusing what we cannot reproduce (`LoraConfig.from_pretrained`).

    >>> read_peft_config("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent has no adapter_config.json; pass a local PEFT adapter directory
    """
    path = os.path.join(os.fspath(adapter_dir), "adapter_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json; pass a local PEFT adapter directory")
    return lora_config_from_peft(read_json(path), path)
