"""Hugging Face state dicts <-> our param trees, and HF names for our module keys.

Our module keys are HF module names (docs/CONVENTIONS.md), so a leaf's HF name is its module key
plus the HF leaf name, and the only real work is orientation:

    ('model','layers','0','self_attn','q_proj','kernel') [in, out]  <->  model.layers.0.self_attn.q_proj.weight [out, in]
    ('transformer','h','0','attn','c_attn','kernel')     [in, out]  <->  transformer.h.0.attn.c_attn.weight [in, out]  (Conv1D)
    (..., 'input_layernorm', 'scale')                                <->  ....input_layernorm.weight
    (..., 'embed_tokens', 'embedding')                               <->  ....embed_tokens.weight
    (..., 'bias')                                                    <->  ....bias

Stacked trees (scan_layers=True) hold the blocks' subtree directly under 'layers' (GPT-2: 'h')
with a leading layer axis; `unstack_layers` / `stack_layers` convert, and `hf_module_name`
re-inserts the layer index into a stacked module key. Which leaves exist and their shapes come
from the model itself (`jax.eval_shape` of its init), so naming can never drift from the modules.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models import families
from lora_jax.models.build import as_dtype, build_model, param_shapes
from lora_jax.models.config import ModelConfig
from lora_jax.tree import ADAPTER_LEAVES, is_param_leaf, iter_leaves, put

LAYER_CONTAINERS = families.layer_containers()  # (('model', 'layers'), ('transformer', 'h'))
CONV1D_MODULES = tuple(m for f in families.families() for m in f.conv1d)  # weight already [in, out] (GPT-2)
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias", "weight": "weight"}


def is_conv1d(module_key: str, cfg: ModelConfig) -> bool:
    """Whether HF stores this module's weight as [in, out] (GPT-2 Conv1D), i.e. untransposed.

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("gpt2", 32, 16, 64, 2, 4, 4, 4)
    >>> is_conv1d("transformer.h.0.attn.c_attn", cfg), is_conv1d("lm_head", cfg)
    (True, False)
    """
    return module_key.split(".")[-1] in families.of(cfg).conv1d


def hf_module_name(module_key: str, layer_index: int | None = None) -> str:
    """The HF module name for a module key; stacked keys need the layer index.

    >>> hf_module_name("model.layers.self_attn.q_proj", 3)
    'model.layers.3.self_attn.q_proj'
    >>> hf_module_name("transformer.h.0.attn.c_attn")
    'transformer.h.0.attn.c_attn'
    """
    for outer, inner in LAYER_CONTAINERS:
        prefix = f"{outer}.{inner}."
        if module_key.startswith(prefix):
            rest = module_key[len(prefix):]
            if rest.split(".")[0].isdigit():
                if layer_index is not None and int(rest.split(".")[0]) != layer_index:
                    raise ValueError(f"module key {module_key!r} already names a layer other than {layer_index}")
                return module_key
            if layer_index is None:
                raise ValueError(f"module key {module_key!r} is stacked (scan_layers); pass layer_index")
            return f"{prefix}{layer_index}.{rest}"
    return module_key


def hf_param_name(path: tuple[str, ...], cfg: ModelConfig) -> tuple[str, bool]:
    """(HF tensor name, transpose?) for an unstacked param path.

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)
    >>> hf_param_name(("model", "layers", "0", "self_attn", "q_proj", "kernel"), cfg)
    ('model.layers.0.self_attn.q_proj.weight', True)
    """
    leaf, module = path[-1], ".".join(path[:-1])
    if leaf in ADAPTER_LEAVES:
        raise ValueError(f"{module}.{leaf} is a LoRA leaf with no place in a base HF state dict; merge() first")
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"param leaf {'.'.join(path)!r} has no HF counterpart")
    return f"{module}.{_LEAF_NAMES[leaf]}", leaf == "kernel" and not is_conv1d(module, cfg)


def _container(params: Mapping) -> tuple[str, str] | None:
    for outer, inner in LAYER_CONTAINERS:
        if outer in params and isinstance(params[outer], Mapping) and inner in params[outer]:
            return outer, inner
    return None


def _is_unstacked(layers: Mapping) -> bool:
    return all(str(k).isdigit() for k in layers)


def unstack_layers(params: Any) -> Any:
    """Stacked blocks (leading layer axis) -> blocks "0".."L-1"; other trees are returned as is.

    >>> p = {"model": {"layers": {"mlp": {"up_proj": {"kernel": np.zeros((2, 4, 8))}}}}}
    >>> sorted(unstack_layers(p)["model"]["layers"]), unstack_layers(p)["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].shape
    (['0', '1'], (4, 8))
    """
    where = _container(params)
    if where is None or _is_unstacked(params[where[0]][where[1]]):
        return params
    outer, inner = where
    layers = params[outer][inner]
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    blocks = {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], layers) for i in range(n)}
    return {**params, outer: {**params[outer], inner: blocks}}


def stack_layers(params: Any) -> Any:
    """Blocks "0".."L-1" -> one subtree with a leading layer axis (what scan_layers=True uses).

    >>> p = {"model": {"layers": {str(i): {"mlp": {"up_proj": {"kernel": np.zeros((4, 8))}}} for i in range(2)}}}
    >>> stack_layers(p)["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape
    (2, 4, 8)
    """
    where = _container(params)
    if where is None or not _is_unstacked(params[where[0]][where[1]]):
        return params
    outer, inner = where
    layers = params[outer][inner]
    blocks = [layers[str(i)] for i in range(len(layers))]

    def stack(*xs):
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

    return {**params, outer: {**params[outer], inner: jax.tree_util.tree_map(stack, *blocks)}}


def _lookup(tensors: Mapping[str, Any], name: str) -> str | None:
    if name in tensors:
        return name
    if name.startswith("transformer.") and name[len("transformer."):] in tensors:
        return name[len("transformer."):]  # original GPT-2 checkpoints lack the prefix
    return None


def from_hf_state_dict(
    tensors: Mapping[str, Any], cfg: ModelConfig, scan_layers: bool = False, param_dtype: Any = "float32",
    host: bool = False, convert: Callable | None = None,
) -> dict:
    """Our param tree from HF-named, HF-oriented tensors (numpy or any array type).

    `host=True` keeps the leaves as numpy arrays in host memory (for `lora_jax.sharding.load_sharded`,
    which hands each device only its slice); otherwise they are `jax.Array`s on the default device.

    Missing tensors and shape mismatches raise ValueError naming the tensor (and both shapes);
    tensors the model has no use for are reported with a warning. `convert(path, tensor,
    transpose, dtype)` may turn a tensor into its final leaf (e.g. a quantized kernel, from
    `lora_jax.quant.loading`) as soon as it is read; it returns None to leave one as is.

    >>> from lora_jax.models.config import ModelConfig
    >>> cfg = ModelConfig("llama", 32, 16, 32, 1, 4, 2, 4, tie_word_embeddings=True)
    >>> sd = {"model.embed_tokens.weight": np.ones((32, 16)), "model.norm.weight": np.ones(16),
    ...       "model.layers.0.input_layernorm.weight": np.ones(16), "model.layers.0.post_attention_layernorm.weight": np.ones(16),
    ...       "model.layers.0.self_attn.q_proj.weight": np.ones((16, 16)), "model.layers.0.self_attn.k_proj.weight": np.ones((8, 16)),
    ...       "model.layers.0.self_attn.v_proj.weight": np.ones((8, 16)), "model.layers.0.self_attn.o_proj.weight": np.ones((16, 16)),
    ...       "model.layers.0.mlp.gate_proj.weight": np.ones((32, 16)), "model.layers.0.mlp.up_proj.weight": np.ones((32, 16)),
    ...       "model.layers.0.mlp.down_proj.weight": np.ones((16, 32))}
    >>> from_hf_state_dict(sd, cfg)["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"].shape
    (16, 8)
    """
    dtype = as_dtype(param_dtype)
    family = families.of(cfg)
    shapes = param_shapes(build_model(cfg, scan_layers=False))
    out: dict = {}
    used = set()
    for path, sds in iter_leaves(shapes):
        codec = family.codec(".".join(path[:-1])) if path[-1] == "kernel" else None
        if codec is not None:  # one leaf from several HF tensors (fused MoE experts)
            names = codec.names(".".join(path[:-1]), cfg)
            keys = [_lookup(tensors, n) for n in names]
            if None in keys:
                raise ValueError(f"checkpoint has no tensor {names[keys.index(None)]!r} (the {cfg.model_type} config needs it)")
            if convert is not None and convert(path, np.zeros((1, 1), np.float32), False, dtype) is not None:
                raise ValueError(f"{'.'.join(path[:-1])!r} is a stack of MoE expert weights, which quantized loading does not support")
            used.update(keys)
            arr = codec.join([np.asarray(tensors[k]) for k in keys], cfg)
            if tuple(arr.shape) != tuple(sds.shape):
                raise ValueError(f"tensors {keys[0]!r}... make a leaf of shape {tuple(arr.shape)} but the config needs "
                                 f"{tuple(sds.shape)}; config.json and the weights disagree")
            put(out, path, arr)
            continue
        name, transpose = hf_param_name(path, cfg)
        hf_shape = tuple(reversed(sds.shape)) if transpose else tuple(sds.shape)
        key = _lookup(tensors, name)
        if key is None:
            raise ValueError(f"checkpoint has no tensor {name!r} (the {cfg.model_type} config needs shape {hf_shape})")
        used.add(key)
        raw = tensors[key]
        leaf = convert(path, raw, transpose, dtype) if convert is not None else None
        if leaf is not None:
            if tuple(leaf.shape) != tuple(sds.shape):
                raise ValueError(f"tensor {key!r} stands for a kernel of shape {tuple(leaf.shape)} but the config needs "
                                 f"{tuple(sds.shape)}; config.json and the weights disagree")
            put(out, path, leaf)
            continue
        arr = np.asarray(raw)
        if tuple(arr.shape) != hf_shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(arr.shape)} but the config needs {hf_shape}; "
                             "config.json and the weights disagree")
        put(out, path, (arr.T if transpose else arr).astype(dtype, copy=False))  # cast now: fp32 never held whole
    unused = sorted(k for k in tensors if k not in used and not k.endswith(family.ignored_suffixes or ("\0",))
                    and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensors are not used by the model: {', '.join(unused[:5])}", stacklevel=2)
    if scan_layers:
        out = stack_layers(out)
    if host:
        return jax.tree_util.tree_map(lambda x: x if is_param_leaf(x) else np.asarray(x).astype(dtype, copy=False), out,
                                      is_leaf=is_param_leaf)
    # quantized kernels keep their fields' own dtypes (uint8 codes, float32 scales)
    return jax.tree_util.tree_map(lambda x: jax.tree.map(jnp.asarray, x) if is_param_leaf(x) else jnp.asarray(x, dtype=dtype),
                                  out, is_leaf=is_param_leaf)


def to_hf_state_dict(params: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named, HF-oriented numpy tensors from a (stacked or unstacked, merged) param tree.

    The tied LM head is not written (HF's save_pretrained omits it too). LoRA leaves raise:
    merge them first.

    >>> from lora_jax.models.config import ModelConfig
    >>> from lora_jax.models.build import build_model
    >>> cfg = ModelConfig("llama", 32, 16, 32, 1, 4, 2, 4)
    >>> p = build_model(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    >>> to_hf_state_dict(p, cfg)["lm_head.weight"].shape
    (32, 16)
    """
    out: dict[str, np.ndarray] = {}
    family = families.of(cfg)
    for path, leaf in iter_leaves(unstack_layers(params)):
        codec = family.codec(".".join(path[:-1])) if path[-1] == "kernel" else None
        if codec is not None:
            out.update(zip(codec.names(".".join(path[:-1]), cfg), codec.split(np.asarray(leaf), cfg)))
            continue
        name, transpose = hf_param_name(path, cfg)
        arr = np.asarray(leaf)
        out[name] = np.ascontiguousarray(arr.T) if transpose else arr
    return out
