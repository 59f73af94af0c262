"""'default' means the embedded model everywhere; adapter configs name a loadable base; generate
stops at the model's EOS by default (as transformers) and refuses prompts longer than its positions."""

import json
import os

import jax
import numpy as np
import pytest

import lora_jax
from lora_jax.models import from_pretrained, gguf


def test_default_base_is_accepted_by_from_pretrained_and_export(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint("llama")
    monkeypatch.setattr(gguf, "default_model_path", lambda: path)  # stand-in for the 100 MB embedded GGUF
    model, params, _ = from_pretrained("default")
    assert model.cfg.vocab_size == 96
    cfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    adapter = lora_jax.save_peft_adapter(lora_jax.inject(params, cfg, jax.random.key(0)), cfg, tmp_path / "a", model_config=model.cfg)
    from train.export import main

    assert main(["--base", "default", "--adapter", adapter, "--format", "peft", "--out", str(tmp_path / "o")]) == 0
    assert json.load(open(tmp_path / "o" / "adapter_config.json"))["base_model_name_or_path"] == os.path.abspath(path)


def test_adapter_of_the_embedded_gguf_names_its_hub_model(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    model, params, _ = from_pretrained(path)
    cfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    gguf_file = "/somewhere/" + gguf.SMOLLM2_FILE
    out = lora_jax.save_peft_adapter(lora_jax.inject(params, cfg, jax.random.key(0)), cfg, tmp_path / "a",
                                     model_config=model.cfg, base_model_name_or_path=gguf_file)
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = open(os.path.join(out, "README.md")).read()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and gguf_file in card


def test_generate_defaults_to_the_model_eos_like_transformers(tiny_checkpoint, tmp_path):
    import torch
    import transformers

    path, hf = tiny_checkpoint("llama")
    ids = np.array([[5, 17, 33, 9, 41]], np.int64)
    with torch.no_grad():
        free = hf.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    eos = int(free[0, ids.shape[1] + 2])  # the third generated token becomes the EOS
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(tmp_path / "m")
    ours, params, _ = from_pretrained(str(tmp_path / "m"))
    assert ours.cfg.eos_token_id == eos
    with torch.no_grad():
        theirs = model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False, pad_token_id=0).numpy()
    got = lora_jax.generate(ours, params, ids, max_new_tokens=6)
    np.testing.assert_array_equal(got, theirs)
    assert got.shape[1] < free.shape[1] and got[0, -1] == eos
    with pytest.raises(ValueError, match="the prompt has 65 tokens but the model has 64 positions"):
        lora_jax.generate(ours, params, np.ones((1, 65), np.int64), max_new_tokens=1)
