"""`from_pretrained`: a Hugging Face checkpoint directory (or a .gguf file) -> (model, params, hf_config).

What is read, in order:

    <dir>/config.json                      transformers.AutoConfig (trust_remote_code is never set)
    <dir>/generation_config.json           if present, its eos/pad ids replace config.json's in the
                                           ModelConfig (as transformers' generate uses them)
    <dir>/model.safetensors                or the shards listed in model.safetensors.index.json
    <dir>/pytorch_model.bin(.index.json)   only if torch is importable, via torch.load(weights_only=True)
    <file>.gguf                            lora_jax.models.gguf.read_gguf -> (hf_config, HF-named tensors)

No torch is needed for safetensors: tensors are read with safetensors' numpy backend (bfloat16 via
ml_dtypes). Tensors are converted to our tree by `lora_jax.models.naming.from_hf_state_dict`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.errors import CorruptFileError, UserError
from lora_jax.models.build import build_model
from lora_jax.models.config import ModelConfig, with_special_ids
from lora_jax.models.naming import from_hf_state_dict

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
    """All tensors of the given .safetensors files as numpy arrays (bf16 as ml_dtypes.bfloat16).

    >>> read_safetensors([])
    {}
    """
    from safetensors import safe_open

    from lora_jax.files import check_safetensors

    out: dict[str, np.ndarray] = {}
    for f in files:
        check_safetensors(f)
        with safe_open(f, framework="numpy") as fh:
            for name in fh.keys():
                out[name] = fh.get_tensor(name)
    return out


def _shards(path: str, index_name: str) -> list[str]:
    from lora_jax.files import read_json

    weight_map = read_json(os.path.join(path, index_name)).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptFileError(f"{os.path.join(path, index_name)} has no 'weight_map'; fix or re-create the file")
    files = sorted(set(weight_map.values()))
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{index_name} lists shard {name!r}, which is missing from {path}")
    return [os.path.join(path, name) for name in files]


def _read_pickles(files: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise FileNotFoundError(
            f"{files[0]} is a pickled PyTorch checkpoint and torch is not installed; convert it to "
            "model.safetensors (or install torch, which is then used with weights_only=True)"
        ) from None
    out: dict[str, np.ndarray] = {}
    for f in files:
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            t = t.float() if t.dtype == torch.bfloat16 else t
            out[name] = t.numpy()
    return out


def read_checkpoint(path: str, lazy: bool = False) -> tuple[Any, dict[str, np.ndarray]]:
    """(transformers config, HF-named tensors) of a checkpoint directory or a .gguf file.

    lazy=True: safetensors and GGUF tensors are read one at a time, when accessed
    (`lora_jax.models.lazy_tensors.LazyTensors`); pickled checkpoints are read whole regardless.

    >>> read_checkpoint("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: checkpoint path /nonexistent does not exist
    """
    path = os.fspath(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from lora_jax.models.gguf import read_gguf

        return read_gguf(path, lazy=lazy)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a checkpoint directory (expected config.json + model.safetensors) or a .gguf file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    hf_config = read_hf_config(path)
    join = lambda name: os.path.join(path, name)  # noqa: E731
    from lora_jax.models.lazy_tensors import lazy_safetensors

    read = lazy_safetensors if lazy else read_safetensors
    if os.path.isfile(join(SAFETENSORS)):
        return hf_config, read([join(SAFETENSORS)])
    if os.path.isfile(join(SAFETENSORS_INDEX)):
        return hf_config, read(_shards(path, SAFETENSORS_INDEX))
    if os.path.isfile(join(PICKLE)):
        return hf_config, _read_pickles([join(PICKLE)])
    if os.path.isfile(join(PICKLE_INDEX)):
        return hf_config, _read_pickles(_shards(path, PICKLE_INDEX))
    raise FileNotFoundError(f"{path} has config.json but no weights: expected {SAFETENSORS} or {SAFETENSORS_INDEX}")


def read_hf_config(path: str):
    """The transformers config of a checkpoint directory, its architecture checked as supported
    (by name, before any weights or tokenizer are read); a malformed config.json is one line."""
    import transformers

    from lora_jax.files import read_json
    from lora_jax.models.config import unsupported_message

    file = os.path.join(path, "config.json")
    raw = read_json(file)
    if raw.get("model_type") not in transformers.CONFIG_MAPPING:  # unknown to transformers too: name it first
        raise UserError(unsupported_message(raw.get("model_type"), raw.get("architectures")))
    try:
        hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers' validators raise several types
        cause = " ".join(str(e.__cause__ or e).split())[:160]
        raise CorruptFileError(f"{file} is not a valid {raw['model_type']} config ({cause}); fix or re-create it") from None
    ModelConfig.from_hf(hf_config)  # an unsupported architecture fails before any weights are read
    return hf_config


def check_checkpoint(path: str) -> None:
    """Everything about a checkpoint that can be checked without reading its tensors: the
    config (architecture supported), the weight files present and each .safetensors file whole.

    >>> check_checkpoint("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: checkpoint path /nonexistent does not exist
    """
    from lora_jax.files import check_safetensors, open_gguf

    path = os.fspath(path)
    if path.endswith(".gguf"):
        from lora_jax.models.gguf import read_gguf_config

        open_gguf(path)
        read_gguf_config(path)
        return
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
    read_hf_config(path)
    join = lambda name: os.path.join(path, name)  # noqa: E731
    if os.path.isfile(join(SAFETENSORS)):
        files = [join(SAFETENSORS)]
    elif os.path.isfile(join(SAFETENSORS_INDEX)):
        files = _shards(path, SAFETENSORS_INDEX)
    elif os.path.isfile(join(PICKLE)) or os.path.isfile(join(PICKLE_INDEX)):
        return
    else:
        raise FileNotFoundError(f"{path} has config.json but no weights: expected {SAFETENSORS} or {SAFETENSORS_INDEX}; "
                                "point at a complete Hugging Face checkpoint")
    for f in files:
        check_safetensors(f)


def generation_ids(cfg: ModelConfig, path: str) -> ModelConfig:
    """`cfg` with the eos/pad ids of `path`/generation_config.json when there is one.

    transformers' `generate` reads the checkpoint's GenerationConfig, which comes from that file
    when present (Llama 3 lists several EOS ids there) and from config.json otherwise.
    """
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return cfg
    import transformers

    from lora_jax.files import read_json

    raw = read_json(file)  # malformed JSON: its own one-line error
    try:
        gen = transformers.GenerationConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise CorruptFileError(f"{file} is not a valid generation config ({' '.join(str(e).split())[:160]}); "
                               "fix or delete it") from None
    return with_special_ids(cfg, gen)


def from_pretrained(
    path: str,
    dtype: Any = "float32",
    param_dtype: Any = None,
    scan_layers: bool = False,
    remat: str | Callable | None = "auto",
    lora: LoraConfig | None = None,
    host: bool = False,
    quantize: Any = None,
    attention: str = "auto",
) -> tuple[Any, dict, Any]:
    """Load an HF checkpoint, a GGUF file or "default" (the embedded SmolLM2-135M-Instruct GGUF):
    (flax model, params, transformers config).

    dtype: compute dtype; param_dtype: storage dtype of the params (None = dtype); scan_layers:
    stack the blocks under nn.scan (params gain a leading layer axis); remat: "auto" (the
    platform's default, `lora_jax.defaults`) / None / "full" / "save_projections" / a
    jax.checkpoint_policies name; lora: the LoraConfig the model scales adapters with
    (`model.clone(lora=cfg)` later works too); host: return numpy leaves in host memory instead of
    arrays on the default device — what `lora_jax.sharding.load_sharded` takes, so a model larger
    than one accelerator is never gathered on one. quantize: None, "nf4", "int8" or a
    `lora_jax.quant.QuantConfig` — each kernel is quantized as soon as it is read, so the
    full-precision model is never held whole; a bitsandbytes 4-bit checkpoint (`*-bnb-4bit`) is
    loaded into the same NF4 layout as is, without re-quantization (`lora_jax.quant.loading`);
    attention: "auto" | "reference" | "xla" | "cudnn" | "splash" (`lora_jax.models.attn_dispatch`).

    >>> import tempfile, transformers, torch
    >>> d = tempfile.mkdtemp()
    >>> hf = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                               num_attention_heads=2, vocab_size=32)
    >>> transformers.LlamaForCausalLM(hf).save_pretrained(d)
    >>> model, params, _ = from_pretrained(d)
    >>> params["lm_head"]["kernel"].shape
    (16, 32)
    >>> type(from_pretrained(d, host=True)[1]["lm_head"]["kernel"]).__name__
    'ndarray'
    """
    from lora_jax.quant.loading import quantizing_reader

    from lora_jax.models.gguf import resolve_model_path

    path = resolve_model_path(path)  # 'default' = the embedded SmolLM2-135M-Instruct GGUF
    hf_config, tensors = read_checkpoint(path, lazy=True)
    cfg = generation_ids(ModelConfig.from_hf(hf_config), path)
    model = build_model(cfg, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat, lora=lora,
                        attention=attention)
    tensors, convert = quantizing_reader(tensors, hf_config, quantize)
    params = from_hf_state_dict(tensors, cfg, scan_layers=scan_layers, param_dtype=model.param_dtype, host=host,
                                convert=convert)
    return model, params, hf_config
