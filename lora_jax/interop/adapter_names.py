"""The PEFT adapter format's names: its files, its tensor names, and our module keys behind them.

    base_model.model.<HF module name>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector

The HF module name is our module key, with a layer index put back for a scan_layers stack
(`kernel_modules`). Shared by the writer (`adapter_save`) and the reader (`adapter_load`); the
format as a whole is described in `lora_jax.interop.adapter`.

>>> _split_name(PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight")
('model.layers.0.self_attn.q_proj', 'lora_a')
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np  # noqa: F401  (the docstring examples use it)

from lora_jax.models.naming import LAYER_CONTAINERS, hf_module_name
from lora_jax.targeting import module_key
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, iter_leaves

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SUFFIXES = {".lora_A.weight": LORA_A, ".lora_B.weight": LORA_B, ".lora_magnitude_vector": LORA_MAGNITUDE}


def is_stacked_key(key: str) -> bool:
    """Whether a module key lives in a scan_layers stack (no layer index after the container).

    >>> is_stacked_key("model.layers.self_attn.q_proj"), is_stacked_key("model.layers.0.self_attn.q_proj")
    (True, False)
    """
    for outer, inner in LAYER_CONTAINERS:
        prefix = f"{outer}.{inner}."
        if key.startswith(prefix):
            return not key[len(prefix):].split(".")[0].isdigit()
    return False


def kernel_modules(params: Any) -> dict[str, tuple[str, int | None, tuple[int, int]]]:
    """HF module name -> (our module key, layer index in a stack or None, kernel (in, out)).

    >>> kernel_modules({"model": {"layers": {"mlp": {"up_proj": {"kernel": np.zeros((2, 4, 8))}}}}})["model.layers.1.mlp.up_proj"]
    ('model.layers.mlp.up_proj', 1, (4, 8))
    """
    out: dict[str, tuple[str, int | None, tuple[int, int]]] = {}
    for path, leaf in iter_leaves(params):
        if path[-1] != KERNEL:
            continue
        key, shape = module_key(path), tuple(leaf.shape)
        if is_stacked_key(key):
            for i in range(shape[0]):
                out[hf_module_name(key, i)] = (key, i, shape[-2:])
        else:
            out[key] = (key, None, shape[-2:])
    return out
def _pin(patterns: dict, key: str, value: Any, current: Any) -> dict:
    """Put an exact-name pattern first (PEFT: first match wins) when the patterns give the wrong value."""
    return patterns if current == value else {re.escape(key): value, **patterns}
def _split_name(name: str) -> tuple[str, str]:
    for suffix, leaf in _SUFFIXES.items():
        if name.startswith(PREFIX) and name.endswith(suffix):
            return name[len(PREFIX):-len(suffix)], leaf
    kind = ("embedding LoRA" if "lora_embedding" in name
            else "LoRA bias" if name.endswith(".bias") else "non-LoRA")
    raise ValueError(f"adapter tensor {name!r} is a {kind} weight, which lora_jax does not support; use a plain LoRA adapter of linear layers")
def _node(params: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(params, Mapping) or part not in params:
            return None
        params = params[part]
    return params
