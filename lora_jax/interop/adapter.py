"""PEFT LoRA adapters <-> our param trees: `save_peft_adapter` and `load_peft_adapter`.

Our module keys are HF module names (docs/CONVENTIONS.md), so PEFT's tensor names are the module
key between a fixed prefix and suffix, and A/B are stored transposed:

    ('model','layers','0','self_attn','q_proj','lora_a')  A [in, r]
        <->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    ('model','layers','0','self_attn','q_proj','lora_b')  B [r, out]
        <->  base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
    ('transformer','h','0','attn','c_attn','lora_a')      (GPT-2 Conv1D: same rule, fan_in_fan_out=true)
    stacked ('model','layers','self_attn','q_proj','lora_a') A [L, in, r]  -> one tensor per layer
    (...,'q_proj','lora_magnitude')  m [out]  <->  ...q_proj.lora_magnitude_vector [out]   (DoRA, use_dora)

The scale PEFT applies is alpha/r (or alpha/sqrt(r)) looked up for the HF module name; ours is the
adapter's own `lora_scale` leaf (one per layer in a stack). Export therefore checks, module by
module, that the written config gives PEFT the rank in the file and the alpha that reproduces our
scale, pinning exact-name rank/alpha patterns where the user's patterns alone would not; import
does the reverse (scales from the config). A stack whose layers differ in rank or skip layers
(`lora_rank` leaf) is written layer by layer with each layer's true rank, skipped layers left out
(the config's `layers_to_transform` / `exclude_modules` say so to PEFT); importing such an adapter
into a stacked model pads A/B to the largest rank and adds the `lora_rank` leaf back.
Every tensor in an adapter file must land somewhere, and every module the config targets must have
weights: anything else is a one-line ValueError, never silently skipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from lora_jax.config import ALL_LINEAR, LoraConfig, pattern_value
from lora_jax.interop._files import atomic_dir, save_safetensors
from lora_jax.interop.param_targets import from_peft, to_peft, wrapper_names
from lora_jax.interop.peft_config import lora_config_from_peft, peft_config_dict
from lora_jax.models.build import build_model, param_shapes
from lora_jax.models.config import ModelConfig
from lora_jax.models.gguf import base_model_name
from lora_jax.models.naming import CONV1D_MODULES, LAYER_CONTAINERS, hf_module_name, is_conv1d
from lora_jax.models import families
from lora_jax.targeting import (OUTPUT_LAYER_NAMES, _in_project_tree, convert_moe_targets, is_parameter_key, is_target, module_key, module_names,
                                resolve_targets)
from lora_jax.transform import combine, has_lora
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_RANK, LORA_SCALE, iter_leaves
from lora_jax.variants.inits import rewrites_base

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


def _model_config(model_config: ModelConfig | None, hf_config: Any) -> ModelConfig:
    if model_config is not None:
        return model_config
    if hf_config is None:
        raise ValueError("pass model_config= (model.cfg) or hf_config= (the transformers config) to name the architecture "
                         "(or, for another linen model, the full param tree, kernels included)")
    return ModelConfig.from_hf(hf_config)


def _pin(patterns: dict, key: str, value: Any, current: Any) -> dict:
    """Put an exact-name pattern first (PEFT: first match wins) when the patterns give the wrong value."""
    return patterns if current == value else {re.escape(key): value, **patterns}


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


def _split_name(name: str) -> tuple[str, str]:
    for suffix, leaf in _SUFFIXES.items():
        if name.startswith(PREFIX) and name.endswith(suffix):
            return name[len(PREFIX):-len(suffix)], leaf
    kind = ("embedding LoRA" if "lora_embedding" in name
            else "LoRA bias" if name.endswith(".bias") else "non-LoRA")
    raise ValueError(f"adapter tensor {name!r} is a {kind} weight, which lora_jax does not support; use a plain LoRA adapter of linear layers")


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


def _node(params: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(params, Mapping) or part not in params:
            return None
        params = params[part]
    return params


def load_peft_adapter(params: Any, adapter_dir: str) -> tuple[Any, LoraConfig]:
    """Add a PEFT LoRA adapter's weights to `params` (stacked or not): (params, its LoraConfig).

    Build the model with the returned config (`model.clone(lora=cfg)`) to reproduce PEFT's output.

    >>> import jax, tempfile, lora_jax
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
