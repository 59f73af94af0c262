"""PEFT adapters for flax.nnx models whose module paths are Hugging Face names (`lora_jax.nnx`).

`save_peft_adapter` writes each `LoraLinear`'s A/B as `base_model.model.{key}.lora_A.weight` [r, in] /
`lora_B.weight` [out, r] (one pair per layer of an nnx.vmap'd stack); `load_peft_adapter` injects
the config's targets and fills them from the file. Both are re-exported by `lora_jax.nnx`.

>>> from lora_jax.nnx import load_peft_adapter, save_peft_adapter
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.config import ALL_LINEAR, LoraConfig, pattern_value
from lora_jax.interop._files import atomic_dir, save_safetensors
from lora_jax.interop.adapter_load import read_adapter
from lora_jax.interop.adapter_names import CONFIG_FILE, PREFIX, WEIGHTS_FILE, _pin
from lora_jax.interop.adapter_save import _alpha_of
from lora_jax.interop.peft_config import lora_config_from_peft, peft_config_dict
from lora_jax.nnx import LoraLinear, adapters, inject
from lora_jax.targeting import _peft_names, resolve_targets


def _layer_names(key: str, m: LoraLinear) -> list[str]:
    """PEFT module names of an adapted module: itself, or one per layer of a stacked (nnx.vmap'd) one."""
    if m.lora_a.ndim == 2:
        return [key]
    names = _peft_names(key, m.lora_a.shape[0]) if m.lora_a.ndim == 3 else [key]
    if len(set(names)) != m.lora_a.shape[0] or m.lora_a.ndim != 3:
        raise ValueError(f"the stacked nnx module {key!r} has no per-layer HF names (not under model.layers / transformer.h); "
                         "PEFT export needs HF module names")
    return names


def _per_layer(key: str, m: LoraLinear):
    """(PEFT name, A [in, r], B [r, out], scale) for each PEFT module an adapted nnx module stands for."""
    a, b = np.asarray(m.lora_a[...], np.float32), np.asarray(m.lora_b[...], np.float32)
    scale = np.asarray(m.lora_scale[...], np.float32)
    names = _layer_names(key, m)
    if len(names) == 1 and a.ndim == 2:
        return [(names[0], a, b, float(scale))]
    return [(n, a[i], b[i], float(scale[i])) for i, n in enumerate(names)]


def save_peft_adapter(model: nnx.Module, config: LoraConfig, out_dir: str, *, base_model_name_or_path: str | None = None,
                      model_type: str | None = None, overwrite: bool = False) -> str:
    """Write the adapters of an nnx model whose module paths are HF names as a PEFT adapter directory.

    Tensors `base_model.model.{key}.lora_A.weight` [r, in] / `lora_B.weight` [out, r]; the config
    pins exact-name rank/alpha patterns wherever the adapter's own rank/scale differ from what
    `config` would give PEFT; task_type is "CAUSAL_LM" when `model_type` names a transformers
    architecture, else null (PEFT's custom-model form). Atomic; an existing non-empty out_dir needs
    overwrite=True.
    """
    config = resolve_targets(config, model_type)
    found = adapters(model)
    if not found:
        raise ValueError("the model holds no LoRA adapters; inject or load one first")
    if any(m.merged for m in found.values()):
        raise ValueError("the adapters are merged into the kernels; unmerge(model) before saving the adapter")
    tensors, ranks, alphas = {}, dict(config.rank_pattern), dict(config.alpha_pattern)
    for key, m in sorted(found.items()):
        for name, a, b, scale in _per_layer(key, m):
            r = a.shape[1]
            alpha = _alpha_of(scale, r, config.alpha_for(name), config.use_rslora)
            ranks = _pin(ranks, name, r, pattern_value(ranks, name, config.r))
            alphas = _pin(alphas, name, alpha, pattern_value(alphas, name, config.alpha))
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)
    targets = config.target_modules
    if targets == ALL_LINEAR:
        targets = tuple(sorted({k.rsplit(".", 1)[-1] for k in found}))
    written = dataclasses.replace(config, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    d = peft_config_dict(written, base_model_name_or_path=base_model_name_or_path)
    if model_type is None:  # a model of the user's own: no task_type, as PEFT saves a custom model (loads on any twin)
        d["task_type"] = None
    with atomic_dir(out_dir, overwrite) as tmp:
        save_safetensors(tensors, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")
    return os.path.abspath(out_dir)


def load_peft_adapter(model: nnx.Module, adapter_dir: str, rngs: nnx.Rngs | jax.Array | None = None) -> tuple[nnx.Module, LoraConfig]:
    """Inject a PEFT LoRA adapter's weights into an nnx model (module paths = HF names), in place.

    Every tensor must land on an adapted module with the shape the config's rank gives, and every
    adapted module must get both tensors; anything else is a one-line ValueError.
    """
    config_dict, tensors = read_adapter(adapter_dir)
    cfg = lora_config_from_peft(config_dict, os.path.join(os.fspath(adapter_dir), CONFIG_FILE))
    inject(model, cfg, rngs if rngs is not None else nnx.Rngs(0))
    found = adapters(model)
    used = set()
    for key, m in found.items():
        names = _layer_names(key, m)
        for leaf, suffix in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            var = getattr(m, leaf)
            need = tuple(var.shape[-2:])[::-1]
            layers = []
            for mod in names:
                name = f"{PREFIX}{mod}.{suffix}.weight"
                if name not in tensors:
                    raise ValueError(f"adapter_config.json targets {mod!r} but the adapter has no {name!r}; the files do not match")
                arr = np.asarray(tensors[name], np.float32)
                if arr.shape != need:
                    raise ValueError(f"adapter tensor {name!r} has shape {arr.shape} but this model needs {need}; "
                                     "the adapter was trained for another model")
                layers.append(arr.T)
                used.add(name)
            var[...] = jnp.asarray(layers[0] if var.ndim == 2 else np.stack(layers), cfg.jnp_dtype)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"adapter tensor {extra[0]!r} matches no adapted nnx module (is it targeted, and do module paths follow HF names?)")
    return model, cfg
