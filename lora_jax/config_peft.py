"""`LoraConfig`'s PEFT side: PEFT's keyword spellings, and the `adapter_config.json` keys it determines.

`LoraConfig(**peft_kwargs)` takes every field of PEFT 0.21's `LoraConfig`: PEFT's spellings of our
fields (`init_lora_weights` -> `init_from_peft`), metadata (accepted whatever the value), and the
features lora_jax does not implement, accepted only at their "off" value and otherwise refused by
name (`check_peft_kwargs`). `peft_dict` / `kwargs_from_peft_dict` map a config to and from the keys
of PEFT's `adapter_config.json` (the full file: `lora_jax.interop.peft_config`). This module does not
import `lora_jax.config`, which builds on it.

>>> init_from_peft(False), init_from_peft("gaussian")
('random', 'gaussian')
"""

from __future__ import annotations

from typing import Any, Mapping

# PEFT LoraConfig keyword -> its "off" values. Metadata, and the sub-configs of inits lora_jax refuses
# anyway (they act only with their init_lora_weights), are accepted whatever the value: None here.
# Every field of PEFT 0.21's LoraConfig is here, so `LoraConfig(**adapter_config_dict)` works.
_PEFT_KWARGS: dict[str, tuple | None] = {
    "task_type": None, "inference_mode": None, "base_model_name_or_path": None, "revision": None,
    "peft_type": None, "fan_in_fan_out": None, "auto_mapping": None, "peft_version": None,
    "runtime_config": None, "ensure_weight_tying": None, "megatron_core": None, "qalora_group_size": None,
    "loftq_config": None, "eva_config": None, "corda_config": None, "lora_ga_config": None,
    "bias": ("none",), "lora_bias": (False,), "modules_to_save": (None, [], ()),
    "layer_replication": (None,), "trainable_token_indices": (None,),
    "megatron_config": (None,), "use_qalora": (False,), "alora_invocation_tokens": (None,),
    "use_bdlora": (None,), "arrow_config": (None,), "kasa_config": (None,), "velora_config": (None,),
    "monteclora_config": (None,),
}
# PEFT's TaskType values. For these PEFT also fully trains the task head (it adds the head to
# modules_to_save), which lora_jax does not do: refused rather than silently left frozen.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_HEAD_TASKS = {"SEQ_CLS": "['classifier', 'score']", "TOKEN_CLS": "['classifier', 'score']", "QUESTION_ANS": "['qa_outputs']"}


def _check_task_type(value: Any) -> None:
    task = getattr(value, "value", value)  # PEFT's TaskType enum or its string
    if task is not None and task not in _TASK_TYPES:
        raise ValueError(f"LoraConfig(task_type={task!r}) is not one of PEFT's task types {_TASK_TYPES}")
    if task in _HEAD_TASKS:
        raise ValueError(f"LoraConfig(task_type={task!r}): PEFT then also fully trains the task head (modules_to_save="
                         f"{_HEAD_TASKS[task]}), which lora_jax does not; train the head yourself and leave task_type unset")


def init_from_peft(init_lora_weights: Any) -> str:
    """Our `init` for PEFT's `init_lora_weights` (True, False or a method name), or a one-line error.

    >>> init_from_peft(True)
    'default'
    """
    if not isinstance(init_lora_weights, (bool, str)):
        raise ValueError(f"LoraConfig(init_lora_weights={init_lora_weights!r}) is not supported; lora_jax initialises "
                         "as PEFT's True (Kaiming A, zero B), False (random A and B), 'gaussian', 'orthogonal', 'pissa', "
                         "'pissa_niter_N' or 'olora'")
    return {True: "default", False: "random"}.get(init_lora_weights, init_lora_weights)


def check_peft_kwargs(peft_kwargs: Mapping[str, Any]) -> None:
    """Accept PEFT's other LoraConfig keywords: metadata as they are, unimplemented features only when off.

    >>> check_peft_kwargs({"task_type": "CAUSAL_LM", "bias": "none"})
    >>> check_peft_kwargs({"bias": "all"})
    Traceback (most recent call last):
    ...
    ValueError: LoraConfig(bias='all'): this PEFT feature is not supported by lora_jax; leave bias at 'none'
    """
    for key, value in peft_kwargs.items():
        if key not in _PEFT_KWARGS:
            raise TypeError(f"LoraConfig got an unexpected keyword argument {key!r}")
        if key == "task_type":
            _check_task_type(value)
        off = _PEFT_KWARGS[key]
        if off is not None and not any(value is o or (not isinstance(value, bool) and value == o) for o in off):
            raise ValueError(f"LoraConfig({key}={value!r}): this PEFT feature is not supported by lora_jax; "
                             f"leave {key} at {off[0]!r}")


def peft_dict(config: Any) -> dict[str, Any]:
    """The keys PEFT writes in `adapter_config.json` that the `LoraConfig` determines (`LoraConfig.to_peft_dict`).

    >>> from lora_jax.config import LoraConfig
    >>> peft_dict(LoraConfig(r=4, target_modules=["q_proj"]))["target_modules"]
    ['q_proj']
    """
    targets = config.target_modules
    excludes = config.exclude_modules
    layers = config.layers_to_transform
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": float(config.alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": targets if targets is None or isinstance(targets, str) else list(targets),
        "exclude_modules": excludes if excludes is None or isinstance(excludes, str) else list(excludes),
        "target_parameters": None if not config.target_parameters else list(config.target_parameters),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": config.use_rslora,
        "init_lora_weights": config.init_lora_weights,
        "use_dora": config.use_dora,
        "layers_to_transform": layers if layers is None or isinstance(layers, int) else list(layers),
        "layers_pattern": config.layers_pattern if config.layers_pattern is None or isinstance(config.layers_pattern, str)
        else list(config.layers_pattern),
    }


def kwargs_from_peft_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """`LoraConfig` keyword arguments from PEFT's `adapter_config.json` dict (`LoraConfig.from_peft_dict`).

    >>> kwargs_from_peft_dict({"r": 4, "init_lora_weights": False})["init"]
    'random'
    """
    init = d.get("init_lora_weights", True)
    return dict(
        r=d.get("r", 8),
        alpha=d.get("lora_alpha", 8),
        dropout=d.get("lora_dropout", 0.0) or 0.0,
        target_modules=d.get("target_modules"),
        target_parameters=d.get("target_parameters") or None,
        exclude_modules=d.get("exclude_modules"),
        rank_pattern=d.get("rank_pattern") or {},
        alpha_pattern=d.get("alpha_pattern") or {},
        use_rslora=bool(d.get("use_rslora", False)),
        init=init if init in ("gaussian", "orthogonal") else "random" if init is False else "default",
        use_dora=bool(d.get("use_dora", False)),
        layers_to_transform=d.get("layers_to_transform"),
        layers_pattern=d.get("layers_pattern") or None,
    )
