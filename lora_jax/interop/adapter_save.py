"""`save_peft_adapter`: our LoRA leaves -> a PEFT adapter directory (the format: `lora_jax.interop.adapter`)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp  # noqa: F401  (the docstring example uses it)
import numpy as np

from lora_jax.config import ALL_LINEAR, LoraConfig, pattern_value
from lora_jax.interop._files import atomic_dir, save_safetensors
from lora_jax.interop.adapter_names import CONFIG_FILE, PREFIX, WEIGHTS_FILE, _node, _pin, is_stacked_key, kernel_modules
from lora_jax.interop.param_targets import to_peft, wrapper_names
from lora_jax.interop.peft_config import peft_config_dict
from lora_jax.models.build import build_model, param_shapes
from lora_jax.models.config import ModelConfig
from lora_jax.models.gguf import base_model_name
from lora_jax.models.naming import hf_module_name, is_conv1d
from lora_jax.models import families
from lora_jax.targeting import _in_project_tree, convert_moe_targets, is_parameter_key, is_target, module_key, module_names, resolve_targets
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_RANK, LORA_SCALE, iter_leaves
from lora_jax.variants.inits import rewrites_base


def _model_config(model_config: ModelConfig | None, hf_config: Any) -> ModelConfig:
    if model_config is not None:
        return model_config
    if hf_config is None:
        raise ValueError("pass model_config= (model.cfg) or hf_config= (the transformers config) to name the architecture "
                         "(or, for another linen model, the full param tree, kernels included)")
    return ModelConfig.from_hf(hf_config)

def save_peft_adapter(params: Any, lora_config: LoraConfig, out_dir: str, *, model_config: ModelConfig | None = None,
                      hf_config: Any = None, base_model_name_or_path: str | None = None, overwrite: bool = False) -> str:
    """Write `adapter_config.json` + `adapter_model.safetensors` that PEFT loads onto the HF base model.

    `params` may be the full tree or only its LoRA leaves (`lora_jax.split(params)[0]`), stacked or
    not. The architecture comes from `model_config` (model.cfg) or `hf_config`; for any other linen
    model pass the full tree (kernels included) and neither: its module keys are the PEFT names, as
    for a torch twin built with the same attribute names (2-D kernels only). base_model_name_or_path
    defaults to hf_config.name_or_path. Returns out_dir. Atomic; an existing non-empty out_dir needs
    overwrite=True.

    >>> import jax, tempfile, lora_jax
    >>> from lora_jax.models import ModelConfig, build_model
    >>> cfg = ModelConfig("llama", 32, 16, 32, 1, 4, 2, 4)
    >>> params = build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    >>> lcfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    >>> d = save_peft_adapter(lora_jax.inject(params, lcfg, jax.random.key(1)), lcfg, tempfile.mkdtemp() + "/a", model_config=cfg)
    >>> sorted(os.listdir(d))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    if rewrites_base(lora_config.init):
        raise ValueError(f"an init={lora_config.init!r} adapter applies to the rewritten (residual) base, not the original; "
                         "convert it first: lora_jax.variants.convert_to_lora(params, initial_lora, lora_config)")
    if model_config is None and hf_config is None and not _in_project_tree(params) and any(
            p[-1] == KERNEL for p, _ in iter_leaves(params)):
        cfg, shapes = None, params  # any linen model: the full tree names its modules (PEFT's names if they follow torch's)
        for key in (module_key(p) for p, _ in iter_leaves(params) if p[-1] == LORA_A):
            kernel = _node(params, key).get(KERNEL)
            if kernel is None:
                raise ValueError(f"params hold an adapter at {key!r} but not its kernel: pass the full tree (or model_config=)")
            if len(getattr(kernel, "shape", ())) != 2:  # (a quantized kernel has the float shape)
                raise ValueError(f"the adapted kernel {key!r} is not 2-D [in, out]: PEFT's LoRA layers are nn.Linear, so it has "
                                 "no PEFT format; save this model's adapters with lora_jax.training checkpoints instead")
    else:
        cfg = _model_config(model_config, hf_config)
        shapes = param_shapes(build_model(cfg))
    lora_config = resolve_targets(lora_config, cfg.model_type if cfg else None)
    if base_model_name_or_path is None and hf_config is not None:
        base_model_name_or_path = getattr(hf_config, "name_or_path", None) or None
    base = kernel_modules(shapes)
    lora_config = convert_moe_targets(lora_config, module_names(shapes))  # PEFT's rewrite for fused MoE experts
    leaves: dict[str, dict[str, np.ndarray]] = {}
    for path, leaf in iter_leaves(params):
        if path[-1] in (LORA_A, LORA_B, LORA_SCALE, LORA_RANK, LORA_MAGNITUDE):
            leaves.setdefault(module_key(path), {})[path[-1]] = np.asarray(leaf, np.float32)
    if not leaves:
        raise ValueError("params hold no LoRA leaves (lora_a/lora_b); inject or load an adapter first")
    tensors: dict[str, np.ndarray] = {}
    ranks, alphas = dict(lora_config.rank_pattern), dict(lora_config.alpha_pattern)
    names: list[str] = []
    expert_ab: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # target_parameters adapters, written below
    for key, ab in sorted(leaves.items()):
        if not {LORA_A, LORA_B} <= set(ab):
            raise ValueError(f"module {key!r} has only {sorted(ab)}; an adapter needs both lora_a and lora_b")
        a, b, scale, rank = ab[LORA_A], ab[LORA_B], ab.get(LORA_SCALE), ab.get(LORA_RANK)
        mag = ab.get(LORA_MAGNITUDE)
        if (mag is not None) != lora_config.use_dora:
            raise ValueError(f"module {key!r} {'has' if mag is not None else 'has no'} DoRA magnitude but lora_config.use_dora="
                             f"{lora_config.use_dora}; pass the LoraConfig the adapters were created with")
        stacked = is_stacked_key(key)
        if rank is not None and not stacked:
            raise ValueError(f"module {key!r} has per-layer ranks (lora_rank) but is not a stacked layer module of the model")
        layers = range(a.shape[0]) if stacked else [None]
        for i in layers:
            a_i, b_i = (a[i], b[i]) if stacked else (a, b)
            if rank is not None:  # padded stack: the layer's true rank; rank 0 = layer not adapted
                if int(rank[i]) == 0:
                    continue
                a_i, b_i = a_i[..., : int(rank[i])], b_i[..., : int(rank[i]), :]
            name = hf_module_name(key, i)
            if name not in base:
                raise ValueError(f"params have an adapter at {name!r}, which the {cfg.model_type if cfg else 'given'} model has no "
                                 "linear layer for; wrong model_config?")
            need = base[name][2]
            if a_i.shape[-2] != need[0] or b_i.shape[-1] != need[1] or a_i.shape[-1] != b_i.shape[-2]:
                raise ValueError(f"adapter at {name!r} has A {a_i.shape} and B {b_i.shape} but the model's kernel is {need}; wrong model_config?")
            r = a_i.shape[-1]
            alpha = lora_config.alpha_for(name)
            if scale is not None:
                s_i = np.unique(np.asarray(scale[i] if stacked else scale).reshape(-1))
                if s_i.size != 1:  # per-expert scales: PEFT's ParamWrapper has one scaling for all experts
                    raise ValueError(f"adapter at {name!r} has different lora_scale values per expert; PEFT holds one")
                alpha = _alpha_of(float(s_i[0]), r, alpha, lora_config.use_rslora)
            ranks = _pin(ranks, name, r, pattern_value(ranks, name, lora_config.r))
            alphas = _pin(alphas, name, alpha, pattern_value(alphas, name, lora_config.alpha))
            if is_parameter_key(name):
                if mag is not None:
                    raise ValueError(f"adapter at {name!r} is DoRA on expert tensors, which PEFT has no format for; use plain LoRA there")
                expert_ab[name] = (a_i, b_i)
            else:
                tensors[f"{PREFIX}{name}.lora_A.weight"] = a_i.T
                tensors[f"{PREFIX}{name}.lora_B.weight"] = b_i.T
                if mag is not None:
                    tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = mag[i] if stacked else mag
            names.append(name)
    if expert_ab:
        declared = families.of(cfg).peft_parameters if cfg else None
        if declared is None:
            raise ValueError(f"params have expert-tensor adapters but the {cfg.model_type if cfg else 'given'} model has no "
                             "expert tensors (pass model_config=)")
        for name, wrapper in wrapper_names(expert_ab, declared[1]).items():
            tensors[f"{PREFIX}{wrapper}.lora_A.weight"], tensors[f"{PREFIX}{wrapper}.lora_B.weight"] = to_peft(*expert_ab[name])
    targets = lora_config.target_modules
    if targets == ALL_LINEAR:  # PEFT saves the expansion: the leaf names of every adapted linear layer
        targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in names if not is_parameter_key(n)}))
    written = dataclasses.replace(lora_config, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    selected = {n for n in base if is_target(written, n)}
    extra, missing = selected - set(names), set(names) - selected
    if extra or missing:
        what = f"targets {sorted(extra)[0]!r}, which has no adapter in params" if extra else f"does not target {sorted(missing)[0]!r}, which has an adapter in params"
        raise ValueError(f"lora_config {what}; pass the LoraConfig the adapters were created with")
    conv1d = cfg is not None and any(is_conv1d(n, cfg) for n in names)
    base_name, gguf_file = base_model_name(base_model_name_or_path)
    config = peft_config_dict(written, fan_in_fan_out=conv1d, base_model_name_or_path=base_name)
    if cfg is None:  # not a causal LM of ours: PeftModel, as PEFT saves a custom model (no task_type)
        config["task_type"] = None
    with atomic_dir(out_dir, overwrite) as tmp:
        save_safetensors(tensors, os.path.join(tmp, WEIGHTS_FILE))
        if gguf_file is not None:  # PEFT's model card (README.md) names the base and notes the GGUF file
            with open(os.path.join(tmp, "README.md"), "w") as f:
                f.write(f"---\nbase_model: {base_name}\nlibrary_name: peft\n---\n\nLoRA adapter trained with lora_jax on "
                        f"the GGUF file `{gguf_file}` (converted from `{base_name}`; load the adapter onto `{base_name}`).\n")
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return os.path.abspath(out_dir)


def _alpha_of(scale: float, r: int, alpha: float, rslora: bool) -> float:
    """The lora_alpha that gives PEFT `scale` at rank r: `alpha` itself when it does (to rounding)."""
    implied = scale * (r**0.5 if rslora else r)
    return alpha if abs(implied - alpha) <= 1e-6 * max(abs(alpha), 1.0) else implied
