"""PEFT -> us: adapters made by PEFT itself (random A and B) load with `load_peft_adapter` and
reproduce PEFT's logits to 1e-4 (fp32); everything we cannot reproduce is refused in one line."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from lora_jax.interop import load_peft_adapter
from lora_jax.models import ModelConfig, build_model, from_pretrained
from parity import assert_close, hf_base, hf_logits, our_logits


def make_peft_adapter(base_path, out, **kwargs):
    """Save a PEFT adapter with random A and B (init_lora_weights=False); return PEFT's logits."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(hf_base(base_path), peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **kwargs))
    model.save_pretrained(out)
    return hf_logits(model.eval())


def load_ours(base_path, adapter_dir, scan_layers=False):
    model, params, _ = from_pretrained(base_path, scan_layers=scan_layers)
    params, cfg = load_peft_adapter(params, adapter_dir)
    return our_logits(model.clone(lora=cfg), params)


CASES = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
    "mistral": dict(r=4, lora_alpha=16, target_modules=r".*\.(q|v)_proj"),
    "qwen2": dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["down_proj"]),
    "qwen3": dict(r=4, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_import_reproduces_peft(arch, tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint(arch)
    theirs = make_peft_adapter(path, tmp_path / "a", **CASES[arch])
    assert np.max(np.abs(theirs - hf_logits(hf_base(path)))) > 1e-2  # the adapter is active
    assert_close(load_ours(path, tmp_path / "a"), theirs)
    if arch == "llama":  # PEFT saved a copy of lm_head's base weight (verified equal); a changed one is refused
        name = "base_model.model.lm_head.base_layer.weight"
        assert name in load_file(tmp_path / "a" / "adapter_model.safetensors")
        edited = _edited(tmp_path / "a", tmp_path, tensors={name: np.ones((96, 64), np.float32)})
        with pytest.raises(ValueError, match="lm_head.base_layer.weight' .* replaces the base weight"):
            load_ours(path, edited)


def test_import_rank_alpha_patterns(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    theirs = make_peft_adapter(path, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True,
                               target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                               rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                               alpha_pattern={"o_proj": 3.0, "layers.0.mlp.up_proj": 12.0})
    assert_close(load_ours(path, tmp_path / "a"), theirs)


@pytest.fixture(scope="module")
def llama_adapter(tiny_checkpoint, tmp_path_factory):
    """(base dir, PEFT adapter dir, PEFT logits): q_proj + v_proj, alpha pattern uniform over layers."""
    path, _ = tiny_checkpoint("llama")
    out = tmp_path_factory.mktemp("peft_llama") / "adapter"
    logits = make_peft_adapter(path, out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 2.0})
    return path, str(out), logits


def test_import_into_scan_layers_model(llama_adapter):
    path, adapter, theirs = llama_adapter
    assert_close(load_ours(path, adapter, scan_layers=True), theirs)


def _edited(adapter, tmp_path, config=None, tensors=None):
    """A copy of `adapter` with adapter_config.json keys set and tensors edited (value None = delete)."""
    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    cfg = json.load(open(out / "adapter_config.json"))
    cfg.update(config or {})
    json.dump(cfg, open(out / "adapter_config.json", "w"))
    sd = load_file(out / "adapter_model.safetensors")
    for k, v in (tensors or {}).items():
        sd.pop(k) if v is None else sd.__setitem__(k, v)
    save_file(sd, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


Q = "base_model.model.model.layers.0.self_attn.q_proj"
REFUSALS = {
    "dora": (dict(use_dora=True), None, r"use_dora=True but .*lora_magnitude_vector is missing"),
    "bias": (dict(bias="all"), None, r"trained biases"),
    "lora_bias": (dict(lora_bias=True), None, r"LoRA biases"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), None, r"modules_to_save"),
    "megatron": (dict(megatron_config={"tensor_model_parallel_size": 2}), None, r"Megatron"),
    "target_parameters": (dict(target_parameters=["mlp.experts.gate_up_proj"]), None, r"target_parameters"),
    "peft_type": (dict(peft_type="IA3"), None, r"peft_type='IA3'; lora_jax loads only LoRA"),
    "task_type": (dict(task_type="SEQ_CLS"), None, r"task_type='SEQ_CLS'"),
    "unknown": (dict(fancy_new_config={"k": 1}), None, r"fancy_new_config=.*does not know"),
    "pissa": (dict(init_lora_weights="pissa"), None, r"rewrites the base weights"),
    "rank": (dict(r=8), None, r"lora_A.weight' has shape \(4, 64\) but this model with r=8 needs \(8, 64\)"),
    "untargeted": (None, {Q.replace("self_attn.q_proj", "mlp.up_proj") + ".lora_A.weight": np.ones((4, 64), np.float32),
                          Q.replace("self_attn.q_proj", "mlp.up_proj") + ".lora_B.weight": np.ones((96, 4), np.float32)},
                   r"mlp.up_proj', which adapter_config.json does not target"),
    "half": (None, {Q + ".lora_B.weight": None}, r"adapter has only .*q_proj.lora_A.weight; both"),
    "missing": (None, {Q + ".lora_A.weight": None, Q + ".lora_B.weight": None}, r"targets 'model.layers.0.self_attn.q_proj' but the adapter has no weights"),
    "embedding": (None, {"base_model.model.model.embed_tokens.lora_embedding_A": np.ones((4, 96), np.float32)}, r"embedding LoRA weight"),
    "magnitude": (None, {Q + ".lora_magnitude_vector": np.ones(64, np.float32)}, r"use_dora=False but .*q_proj.lora_magnitude_vector is present"),
    "v4_experts": (None, {"base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_A.weight": np.ones((4, 64), np.float32)},
                   r"per-expert LoRA of transformers 4.*PeftModel.from_pretrained\(base, dir\).save_pretrained"),
    "unknown_module": (None, {"base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": np.ones((4, 64), np.float32)},
                       r"no linear layer for; the adapter was trained for another architecture"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals(case, llama_adapter, tmp_path):
    path, adapter, _ = llama_adapter
    config, tensors, match = REFUSALS[case]
    params = build_model(ModelConfig("llama", 96, 64, 96, 2, 4, 2, 16)).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    with pytest.raises(ValueError, match=match) as e:
        load_peft_adapter(params, _edited(adapter, tmp_path, config, tensors))
    assert "\n" not in str(e.value)


def test_refuses_other_architecture_and_hidden_size(llama_adapter, tiny_checkpoint, tmp_path):
    path, adapter, _ = llama_adapter
    _, gpt2, _ = from_pretrained(tiny_checkpoint("gpt2")[0])
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight' \(4, 64\) is for module .* no linear layer for"):
        load_peft_adapter(gpt2, adapter)
    with pytest.raises(ValueError, match="LoRA on a tied LM head is not supported"):
        load_peft_adapter(gpt2, _edited(adapter, tmp_path, tensors={"base_model.model.lm_head.lora_A.weight": np.ones((4, 64), np.float32)}))
    small = build_model(ModelConfig("llama", 96, 32, 96, 2, 4, 2, 8)).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight' has shape \(4, 64\) but this model with r=4 needs \(4, 32\)"):
        load_peft_adapter(small, adapter)
    loaded, _ = load_peft_adapter(build_model(ModelConfig("llama", 96, 64, 96, 2, 4, 2, 16)).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"], adapter)
    with pytest.raises(ValueError, match="already hold LoRA leaves"):
        load_peft_adapter(loaded, adapter)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft_adapter(small, os.path.dirname(adapter) + "/nothing")


def test_per_layer_ranks_and_layer_subset_load_into_scan_layers_model(tiny_checkpoint, tmp_path):
    # Per-layer ranks / alphas and a layer subset (PEFT's layers_to_transform) in a stacked model:
    # A/B padded to the largest rank (lora_rank), per-layer scales, PEFT's logits.
    path, _ = tiny_checkpoint("llama")
    theirs = make_peft_adapter(path, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 3})
    assert_close(load_ours(path, tmp_path / "a", scan_layers=True), theirs)
    theirs = make_peft_adapter(path, tmp_path / "b", r=2, target_modules=["v_proj"], layers_to_transform=1)
    assert_close(load_ours(path, tmp_path / "b", scan_layers=True), theirs)
    _, params, _ = from_pretrained(path, scan_layers=True)
    node = load_peft_adapter(params, tmp_path / "a")[0]["model"]["layers"]["self_attn"]["q_proj"]
    assert node["lora_rank"].tolist() == [4, 2] and node["lora_scale"].tolist() == [0.75, 4.0]
