"""`save_merged`: fold the adapters into the kernels and write a Hugging Face checkpoint directory.

    <out_dir>/config.json                       the base model's config, dtype set to the saved dtype
    <out_dir>/model.safetensors                 HF-named, HF-oriented tensors ({"format": "pt"})
      or model-0000i-of-0000n.safetensors +     when the tensors exceed max_shard_size, with the
         model.safetensors.index.json           index transformers reads ({"metadata", "weight_map"})
    <out_dir>/tokenizer files                   if a tokenizer (object or directory) is given; from a
                                                directory also generation_config.json

Names and orientation come from `lora_jax.models.naming.to_hf_state_dict`; a tied LM head is not
written (the model ties it on load), so `AutoModelForCausalLM.from_pretrained(out_dir)` reports no
missing or unexpected keys. The merge happens in float32; the cast to `dtype` is the last step.
A quantized (QLoRA) base is dequantized first and written in full precision, with a warning.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any

import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.interop._files import atomic_dir, save_safetensors
from lora_jax.models.config import ModelConfig
from lora_jax.models.naming import to_hf_state_dict
from lora_jax.quant.quantize import dequantize_params, has_quantized
from lora_jax.transform import has_lora, merge

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or "5GB" / "500MB" / "2GiB" as transformers writes them.

    >>> parse_size("5GB"), parse_size("1KiB"), parse_size(100)
    (5000000000, 1024, 100)
    """
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * _UNITS[unit])
            except ValueError:
                break
    raise ValueError(f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB'")


def np_dtype(dtype: str) -> Any:
    """numpy dtype for 'float32' / 'bfloat16' / 'float16' (and bf16 / fp16 / fp32).

    >>> np_dtype("bf16").name
    'bfloat16'
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported for export; use float32, bfloat16 or float16")
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if DTYPES[dtype] == "bfloat16" else np.dtype(DTYPES[dtype])


def write_sharded(tensors: dict[str, np.ndarray], out_dir: str, max_shard_size: int | str = "5GB") -> list[str]:
    """model.safetensors, or shards + model.safetensors.index.json above `max_shard_size`; returns file names.

    >>> import tempfile
    >>> write_sharded({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}, tempfile.mkdtemp(), 16)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """
    limit = parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_safetensors(shards[0], os.path.join(out_dir, "model.safetensors"))
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, os.path.join(out_dir, fname))
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return names + ["model.safetensors.index.json"]


def save_merged(params: Any, lora_config: LoraConfig | None, out_dir: str, *, hf_config: Any, dtype: str = "float32",
                tokenizer: Any = None, max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
    """Merge the adapters (if any) and write an HF checkpoint that transformers loads as is; returns out_dir.

    tokenizer: an object with `save_pretrained`, or a directory (the base model's) whose tokenizer
    files and generation_config.json are copied.
    Atomic; an existing non-empty out_dir needs overwrite=True.

    >>> import jax, jax.numpy as jnp, tempfile, transformers
    >>> from lora_jax.models import ModelConfig, build_model
    >>> hf = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                               num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
    >>> params = build_model(ModelConfig.from_hf(hf)).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    >>> d = save_merged(params, None, tempfile.mkdtemp() + "/m", hf_config=hf, dtype="bfloat16")
    >>> sorted(os.listdir(d))
    ['config.json', 'model.safetensors']
    """
    target = np_dtype(dtype)
    cfg = ModelConfig.from_hf(hf_config)
    if has_quantized(params):  # a QLoRA base: written in full precision, with a warning about rounding
        params = dequantize_params(params, "float32", warn=True)
    if has_lora(params):
        params = merge(params, lora_config)  # each adapter's own lora_scale (the config only for adapters without)
    tensors = {k: np.asarray(v, np.float32).astype(target) for k, v in to_hf_state_dict(params, cfg).items()}
    config = copy.deepcopy(hf_config)
    config.dtype = DTYPES[dtype]
    if getattr(config, "quantization_config", None) is not None:  # a bnb-4bit base: the merged weights are full precision
        del config.quantization_config
    with atomic_dir(out_dir, overwrite) as tmp:
        write_sharded(tensors, tmp, max_shard_size)
        config.save_pretrained(tmp)
        if isinstance(tokenizer, (str, os.PathLike)):
            copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, f))]
            for f in copied:
                shutil.copyfile(os.path.join(tokenizer, f), os.path.join(tmp, f))
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.abspath(out_dir)
