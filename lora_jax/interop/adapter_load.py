"""`load_peft_adapter`: a PEFT adapter directory -> LoRA leaves on our params (the format: `lora_jax.interop.adapter`)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.interop.adapter_names import CONFIG_FILE, PREFIX, WEIGHTS_FILE, _node, _pin, _split_name, kernel_modules
from lora_jax.interop.param_targets import from_peft, wrapper_names
from lora_jax.interop.peft_config import lora_config_from_peft
from lora_jax.models.naming import CONV1D_MODULES
from lora_jax.models import families
from lora_jax.targeting import OUTPUT_LAYER_NAMES, is_parameter_key, is_target
from lora_jax.transform import combine, has_lora
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_RANK, LORA_SCALE


def read_adapter(adapter_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json dict, tensors) of a PEFT adapter directory.

    >>> read_adapter("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent has no adapter_config.json; pass a PEFT adapter directory
    """
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{adapter_dir} has no {CONFIG_FILE}; pass a PEFT adapter directory")
    from lora_jax.files import read_json

    config = read_json(cfg_path)
    st, pt = os.path.join(adapter_dir, WEIGHTS_FILE), os.path.join(adapter_dir, "adapter_model.bin")
    if os.path.isfile(st):
        from lora_jax.models.loading import read_safetensors

        return config, read_safetensors([st])
    if os.path.isfile(pt):
        import torch

        sd = torch.load(pt, map_location="cpu", weights_only=True)
        return config, {k: v.float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"{adapter_dir} has {CONFIG_FILE} but no {WEIGHTS_FILE}")

def _is_base_copy(name: str, arr: np.ndarray, params: Any, kernels: dict) -> bool:
    """Whether `name` is a copy of a base weight PEFT saved alongside the adapter (it does so for
    embedding/LM-head targets: `lm_head.base_layer.weight`, `model.embed_tokens.weight`). A copy equal to
    the base weight is verified and skipped; a different one (trained embeddings) is refused."""
    if not name.startswith(PREFIX):
        return False
    mod = name[len(PREFIX):]
    if mod.endswith(".base_layer.weight") and mod[: -len(".base_layer.weight")] in kernels:
        mod = mod[: -len(".base_layer.weight")]
        key, layer, _ = kernels[mod]
        node = _node(params, key)
        base = np.asarray(node[KERNEL] if layer is None else node[KERNEL][layer])
        base = base if mod.split(".")[-1] in CONV1D_MODULES and mod.startswith("transformer.") else base.T
    elif mod.endswith(".weight") and isinstance(_node(params, mod[: -len(".weight")]), Mapping) and "embedding" in _node(params, mod[: -len(".weight")]):
        base = np.asarray(_node(params, mod[: -len(".weight")])["embedding"])
    else:
        return False
    if arr.shape != base.shape or not np.array_equal(np.asarray(arr).astype(base.dtype), base):
        raise ValueError(f"adapter tensor {name!r} {tuple(arr.shape)} replaces the base weight {tuple(base.shape)} with other values "
                         "(trained embeddings / LM head); lora_jax loads LoRA weights only")
    return True

def load_peft_adapter(params: Any, adapter_dir: str) -> tuple[Any, LoraConfig]:
    """Add a PEFT LoRA adapter's weights to `params` (stacked or not): (params, its LoraConfig).

    Build the model with the returned config (`model.clone(lora=cfg)`) to reproduce PEFT's output.

    >>> import jax, tempfile, lora_jax
    >>> from lora_jax.interop.adapter_save import save_peft_adapter
    >>> from lora_jax.models import ModelConfig, build_model
    >>> cfg = ModelConfig("llama", 32, 16, 32, 1, 4, 2, 4)
    >>> params = build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    >>> lcfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    >>> d = save_peft_adapter(lora_jax.inject(params, lcfg, jax.random.key(1)), lcfg, tempfile.mkdtemp() + "/a", model_config=cfg)
    >>> p, c = load_peft_adapter(params, d)
    >>> p["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"].shape, c.r
    ((16, 2), 2)
    """
    config_dict, tensors = read_adapter(adapter_dir)
    cfg = lora_config_from_peft(config_dict, os.path.join(os.fspath(adapter_dir), CONFIG_FILE))
    if has_lora(params):
        raise ValueError("params already hold LoRA leaves; merge() or split() them off before loading an adapter")
    kernels = kernel_modules(params)
    wrappers = _expert_wrappers(kernels, cfg)  # PEFT ParamWrapper module -> our expert-tensor name
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        if _is_base_copy(name, arr, params, kernels):
            continue
        mod, leaf = _split_name(name)
        mod = wrappers.get(mod, mod)
        if mod not in kernels and mod.split(".")[-1] in OUTPUT_LAYER_NAMES:
            raise ValueError(f"adapter tensor {name!r} adapts {mod!r}, which this model ties to the embedding (no linear "
                             "layer of its own); LoRA on a tied LM head is not supported")
        if mod not in kernels and re.search(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)$", mod):
            raise ValueError(f"adapter tensor {name!r} is a per-expert LoRA of transformers 4, whose experts transformers 5 fuses; "
                             "PEFT converts it on load: PeftModel.from_pretrained(base, dir).save_pretrained(new_dir), then load new_dir")
        if mod not in kernels:
            raise ValueError(f"adapter tensor {name!r} {tuple(arr.shape)} is for module {mod!r}, which this model has no "
                             "linear layer for; the adapter was trained for another architecture")
        found.setdefault(mod, {})[leaf] = np.asarray(arr, np.float32)
    for mod in sorted(set(kernels) | set(found)):
        selected, ab = is_target(cfg, mod), found.get(mod)
        if selected and ab is None:
            raise ValueError(f"adapter_config.json targets {mod!r} but the adapter has no weights for it; the files do not match")
        if ab is None:
            continue
        if not selected:
            raise ValueError(f"adapter tensor {PREFIX}{mod}.lora_A.weight is for {mod!r}, which adapter_config.json does not target")
        if not {LORA_A, LORA_B} <= set(ab):
            raise ValueError(f"adapter has only {PREFIX}{mod}.{'lora_A' if LORA_A in ab else 'lora_B'}.weight; both lora_A and lora_B are needed")
        if (LORA_MAGNITUDE in ab) != cfg.use_dora:
            raise ValueError(f"adapter_config.json has use_dora={cfg.use_dora} but {PREFIX}{mod}.lora_magnitude_vector is "
                             f"{'present' if LORA_MAGNITUDE in ab else 'missing'}; the files do not match")
        d_in, d_out = kernels[mod][2]
        r = cfg.rank_for(mod)
        e = _n_experts(params, kernels[mod][0]) if is_parameter_key(mod) else 1
        for leaf, need in ((LORA_A, (r * e, d_in)), (LORA_B, (d_out, r * e)), (LORA_MAGNITUDE, (d_out,))):
            if leaf in ab and ab[leaf].shape != need:
                tname = f"{PREFIX}{mod}.{ {LORA_A: 'lora_A.weight', LORA_B: 'lora_B.weight'}.get(leaf, 'lora_magnitude_vector')}"
                raise ValueError(f"adapter tensor {tname!r} has shape {ab[leaf].shape} but this model with r={r} needs {need}; "
                                 "the adapter was trained for another model (hidden size / rank differ)")
    tree, cfg = _lora_tree(found, kernels, cfg, {m: _n_experts(params, kernels[m][0]) for m in found if is_parameter_key(m)})
    return combine(params, tree), cfg


def _n_experts(params: Any, key: str) -> int:
    return int(np.shape(_node(params, key)[KERNEL])[-3])


def _expert_wrappers(kernels: dict, cfg: LoraConfig) -> dict[str, str]:
    """PEFT module names of the ParamWrappers `cfg.target_parameters` creates -> our expert-tensor names."""
    targeted = [n for n in kernels if is_parameter_key(n) and is_target(cfg, n)]
    if not targeted:
        if cfg.target_parameters:  # as PEFT: "target_parameters were set but no parameter was matched"
            raise ValueError(f"adapter_config.json target_parameters={list(cfg.target_parameters)} match no parameter of "
                             "this model (no MoE expert tensors of that name); the adapter was trained for another architecture")
        return {}
    declared = next((f.peft_parameters[1] for f in families.families()
                     if f.peft_parameters and f.is_parameter_module(targeted[0])), None)
    if declared is None:
        raise ValueError(f"no model family declares the expert tensor {targeted[0]!r}")
    return {wrapper: name for name, wrapper in wrapper_names(targeted, declared).items()}


def _lora_tree(found: dict, kernels: dict, cfg: LoraConfig, experts: dict[str, int]) -> tuple[dict, LoraConfig]:
    """Nested LoRA leaves for the model's module keys; stacks per-layer tensors where the model is stacked.
    `experts`: module -> number of experts for the expert tensors (PEFT target_parameters layout)."""

    def ours(m):  # (a [*E, in, r], b [*E, r, out], scale [*E]) of one PEFT module
        if m in experts:
            a, b = from_peft(found[m][LORA_A], found[m][LORA_B], experts[m])
            return a, b, np.full((experts[m],), cfg.scale_for(m), np.float32)
        return found[m][LORA_A].T, found[m][LORA_B].T, np.float32(cfg.scale_for(m))

    by_key: dict[str, dict[int | None, str]] = {}
    for mod in found:
        key, layer, _ = kernels[mod]
        by_key.setdefault(key, {})[layer] = mod
    tree: dict = {}
    ranks, alphas = dict(cfg.rank_pattern), dict(cfg.alpha_pattern)
    for key, layers in sorted(by_key.items()):
        mods = [layers[i] for i in sorted(layers, key=lambda i: -1 if i is None else i)]
        r_set, alpha_set = {cfg.rank_for(m) for m in mods}, {cfg.alpha_for(m) for m in mods}
        extra: dict[str, np.ndarray] = {}
        if None not in layers:
            n_layers = sum(1 for k in kernels.values() if k[0] == key)
            ranks_i = [cfg.rank_for(layers[i]) if i in layers else 0 for i in range(n_layers)]
            per = {i: ours(m) for i, m in layers.items()}
            if cfg.use_dora and (len(set(ranks_i)) != 1):
                raise ValueError(f"the DoRA adapter gives {key!r} per-layer ranks or skips layers, which a scan_layers model "
                                 "cannot hold with DoRA; load it into a model built with scan_layers=False")
            mag = np.stack([found[layers[i]][LORA_MAGNITUDE] for i in range(n_layers)]) if cfg.use_dora else None
            if len(set(ranks_i)) == 1:  # every layer, one rank (per-layer alphas live in the scale vector)
                a, b, scale = (np.stack(x).astype(np.float32) for x in zip(*(per[i] for i in range(n_layers))))
            else:  # per-layer ranks or skipped layers: pad to the largest rank, record each layer's (lora_rank)
                if any(m in experts for m in mods):
                    raise ValueError(f"the adapter gives the expert tensors {key!r} per-layer ranks or skips layers, which a "
                                     "scan_layers model cannot hold; load it into a model built with scan_layers=False")
                r_max, (a0, b0, _) = max(ranks_i), per[min(per)]
                a = np.zeros((n_layers, a0.shape[0], r_max), np.float32)
                b = np.zeros((n_layers, r_max, b0.shape[1]), np.float32)
                scale = np.zeros((n_layers,), np.float32)
                for i, (a_i, b_i, s_i) in per.items():
                    a[i, :, : ranks_i[i]], b[i, : ranks_i[i]], scale[i] = a_i, b_i, s_i
                extra[LORA_RANK] = np.asarray(ranks_i, np.int32)
        else:
            a, b, scale = ours(mods[0])
            mag = found[mods[0]].get(LORA_MAGNITUDE)
        if len(r_set) == 1 and len(alpha_set) == 1:
            (r,), (alpha,) = r_set, alpha_set
            ranks = _pin(ranks, key, r, cfg.rank_for(key))
            alphas = _pin(alphas, key, alpha, cfg.alpha_for(key))
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})
        node[LORA_A] = jnp.asarray(np.ascontiguousarray(a), cfg.jnp_dtype)
        node[LORA_B] = jnp.asarray(np.ascontiguousarray(b), cfg.jnp_dtype)
        node[LORA_SCALE] = jnp.asarray(scale, jnp.float32)
        node.update({k: jnp.asarray(v) for k, v in extra.items()})
        if mag is not None:
            node[LORA_MAGNITUDE] = jnp.asarray(mag, cfg.jnp_dtype)
    return tree, dataclasses.replace(cfg, rank_pattern=ranks, alpha_pattern=alphas)
