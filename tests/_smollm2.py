"""SmolLM2-135M-Instruct (GGUF Q4_1) loaded once per test process, ours and transformers' (fp32)."""

import functools
import pathlib

import pytest

from lora_jax.models import gguf as lg

PROMPT = "What equipment do I need for rock climbing?"


def path() -> str:
    try:
        return lg.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@functools.lru_cache(maxsize=None)
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    p = pathlib.Path(path())
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def read():
    return lg.read_gguf(path())


@functools.lru_cache(maxsize=None)
def ours(scan_layers=True):
    """(model, params) as `from_pretrained(path(), scan_layers=...)` builds them, from the shared read.

    Scanned layers by default: compiling 30 unrolled blocks costs ~20 s more on a 2-core CPU;
    tests on tiny models check that unrolled and scanned models generate the same tokens.
    """
    from lora_jax.models import ModelConfig, build_model, from_hf_state_dict

    hf_config, tensors = read()
    cfg = ModelConfig.from_hf(hf_config)
    model = build_model(cfg, scan_layers=scan_layers)
    return model, from_hf_state_dict(tensors, cfg, scan_layers=scan_layers, param_dtype=model.param_dtype)


@functools.lru_cache(maxsize=None)
def tokenizer():
    return lg.load_tokenizer(path())
