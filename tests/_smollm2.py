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
def ours():
    from lora_jax.models import from_pretrained

    model, params, _ = from_pretrained(path())
    return model, params


@functools.lru_cache(maxsize=None)
def tokenizer():
    return lg.load_tokenizer(path())
