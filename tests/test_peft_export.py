"""Our adapters -> PEFT: `save_peft_adapter` checked against the real `PeftModel.from_pretrained`.

Every adapter has random nonzero A and B; PEFT must load it with no missing/unexpected keys and
its logits must match ours to 1e-4 (fp32). The shared helpers live in tests/parity.py.
"""

import json
import os
import warnings

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

import lora_jax
from lora_jax.interop import load_peft_adapter, save_peft_adapter
from lora_jax.models import ModelConfig
from parity import assert_close, hf_base, hf_logits, our_logits, ours, peft_logits, randomize_lora

LINEAR = {"gpt2": ("c_attn", "c_proj", "c_fc"),
          "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")}
















CASES = {
    "llama": lambda: lora_jax.LoraConfig(r=4, alpha=8, target_modules=LINEAR["llama"]),
    "mistral": lambda: lora_jax.LoraConfig(r=4, alpha=16, target_modules=("q_proj", "v_proj", "down_proj")),
    "qwen2": lambda: lora_jax.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")),
    "qwen3": lambda: lora_jax.LoraConfig(r=4, alpha=4, target_modules="all-linear", exclude_modules=("o_proj",)),
    "gpt2": lambda: lora_jax.LoraConfig(r=4, alpha=8, target_modules=LINEAR["gpt2"]),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_export_matches_peft(arch, tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint(arch)
    lcfg = CASES[arch]()
    model, base, params = ours(path, lcfg)
    out = save_peft_adapter(params, lcfg, tmp_path / "a", model_config=model.cfg, base_model_name_or_path=path)
    mine, theirs = our_logits(model, params), peft_logits(path, out)
    assert np.max(np.abs(theirs - hf_logits(hf_base(path)))) > 1e-2  # the adapter is active
    assert_close(mine, theirs)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["fan_in_fan_out"] is (arch == "gpt2") and cfg["base_model_name_or_path"] == path
    # Round trip: importing what we wrote gives back the same leaves.
    back, back_cfg = load_peft_adapter(base, out)
    for (p1, x), (p2, y) in zip(jax.tree_util.tree_leaves_with_path(lora_jax.split(params)[0]),
                                jax.tree_util.tree_leaves_with_path(lora_jax.split(back)[0])):
        assert p1 == p2 and np.array_equal(np.asarray(x), np.asarray(y))
    assert_close(our_logits(model.clone(lora=back_cfg), back), mine, 0)


def test_adapter_config_has_every_peft_key(tiny_checkpoint, tmp_path):
    import peft

    path, _ = tiny_checkpoint("llama")
    lcfg = lora_jax.LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=("q_proj",), use_rslora=True)
    model, _, params = ours(path, lcfg)
    out = save_peft_adapter(params, lcfg, tmp_path / "a", model_config=model.cfg)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    expected = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").to_dict()
    assert set(expected) <= set(cfg), set(expected) - set(cfg)
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"],
            cfg["bias"], cfg["inference_mode"], cfg["target_modules"]) == ("LORA", "CAUSAL_LM", 4, 8.0, 0.05, True, "none", True, ["q_proj"])
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").shape == (4, 64)
        assert f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").shape == (64, 4)


def test_rank_alpha_patterns_and_rslora(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    lcfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "up_proj"), use_rslora=True,
                               rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                               alpha_pattern={"o_proj": 3.0, "layers.0.mlp.up_proj": 12.0})
    model, _, params = ours(path, lcfg)
    assert params["model"]["layers"]["1"]["self_attn"]["q_proj"]["lora_a"].shape == (64, 6)
    out = save_peft_adapter(params, lcfg, tmp_path / "a", model_config=model.cfg)
    assert_close(our_logits(model, params), peft_logits(path, out))


def test_scan_layers_export_per_layer_patterns(tiny_checkpoint, tmp_path):
    # Stacked leaves are written per layer. Patterns are matched on each layer's PEFT name, so layer 0
    # of the stack gets the pattern's alpha 32 exactly as PEFT gives it (scale vector [8, 2]).
    path, _ = tiny_checkpoint("qwen2")
    lcfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"), alpha_pattern={"layers.0.self_attn.q_proj": 32.0})
    model, base, params = ours(path, lcfg, scan_layers=True)
    assert params["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 64, 4)
    assert params["model"]["layers"]["self_attn"]["q_proj"]["lora_scale"].tolist() == [8.0, 2.0]
    out = save_peft_adapter(params, lcfg, tmp_path / "a", hf_config=None, model_config=model.cfg)
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "numpy") as f:
        assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in f.keys()
    alphas = json.load(open(os.path.join(out, "adapter_config.json")))["alpha_pattern"]
    assert alphas == {"layers.0.self_attn.q_proj": 32.0}  # the user's pattern is enough: nothing pinned
    assert_close(our_logits(model, params), peft_logits(path, out))
    back, back_cfg = load_peft_adapter(base, out)  # and back into the stacked model
    assert_close(our_logits(model.clone(lora=back_cfg), back), our_logits(model, params), 0)


def test_refuses_overwrite_and_mismatched_config(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    lcfg = lora_jax.LoraConfig(r=4, target_modules=("q_proj",))
    model, _, params = ours(path, lcfg)
    out = tmp_path / "a"
    save_peft_adapter(params, lcfg, out, model_config=model.cfg)
    with pytest.raises(FileExistsError, match="not empty"):
        save_peft_adapter(params, lcfg, out, model_config=model.cfg)
    save_peft_adapter(params, lcfg, out, model_config=model.cfg, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind
    import transformers

    d = save_peft_adapter(params, lcfg, tmp_path / "d", hf_config=transformers.AutoConfig.from_pretrained(path))
    assert json.load(open(os.path.join(d, "adapter_config.json")))["base_model_name_or_path"] == path
    with pytest.raises(ValueError, match="targets 'model.layers.0.self_attn.v_proj', which has no adapter"):
        save_peft_adapter(params, lora_jax.LoraConfig(r=4, target_modules=("q_proj", "v_proj")), tmp_path / "b", model_config=model.cfg)
    other = ModelConfig("llama", 96, 32, 96, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="kernel is"):
        save_peft_adapter(params, lcfg, tmp_path / "c", model_config=other)
    assert sorted(os.listdir(tmp_path)) == ["a", "d"]  # nothing half-written


def test_smollm2_135m_adapter_size(tmp_path):
    # SmolLM2-135M's real shapes, r=8 on q_proj,v_proj; zero adapters, no weights loaded.
    cfg = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, tie_word_embeddings=True)
    lcfg = lora_jax.LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    attn = lambda out: {"lora_a": np.zeros((576, 8), np.float32), "lora_b": np.zeros((8, out), np.float32)}  # noqa: E731
    lora = {"model": {"layers": {str(i): {"self_attn": {"q_proj": attn(576), "v_proj": attn(192)}} for i in range(30)}}}
    out = save_peft_adapter(lora, lcfg, tmp_path / "a", model_config=cfg)
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "numpy") as f:
        n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert n == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) == 460800  # 1.8 MB in fp32



def test_scan_layers_gpt2_round_trip(tiny_checkpoint, tmp_path):
    # GPT-2's stack lives under transformer.h; Conv1D weights keep PEFT's [r, in] / [out, r] layout.
    path, _ = tiny_checkpoint("gpt2")
    lcfg = lora_jax.LoraConfig(r=2, alpha=4, target_modules=("c_attn", "c_fc"), use_rslora=True)
    model, base, params = ours(path, lcfg, scan_layers=True)
    out = save_peft_adapter(params, lcfg, tmp_path / "a", model_config=model.cfg)
    mine = our_logits(model, params)
    assert_close(mine, peft_logits(path, out))
    back, back_cfg = load_peft_adapter(base, out)
    assert_close(our_logits(model.clone(lora=back_cfg), back), mine, 0)


def test_any_linen_model_exports_to_its_torch_twin(tmp_path):
    # PEFT's tests/test_custom_models.py MLP: a linen model with torch's attribute names exports without a
    # model_config; PeftModel.from_pretrained on the torch twin loads it (no missing/unexpected keys), same output.
    import flax.linen as nn
    from peft import PeftModel

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="lin1")(nn.relu(nn.Dense(20, name="lin0")(x)))

    torch.manual_seed(0)
    twin = torch.nn.Sequential()
    twin.add_module("lin0", torch.nn.Linear(10, 20)), twin.add_module("relu", torch.nn.ReLU()), twin.add_module("lin1", torch.nn.Linear(20, 2))
    params = {n: {"kernel": jax.numpy.asarray(m.weight.detach().numpy().T), "bias": jax.numpy.asarray(m.bias.detach().numpy())}
              for n, m in twin.named_children() if n != "relu"}
    lcfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=["lin0", "lin1"], use_rslora=True, rank_pattern={"lin1": 2})
    adapted = randomize_lora(lora_jax.inject(params, lcfg, jax.random.key(0)))
    x = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
    ours = np.asarray(lora_jax.apply(MLP().apply, lcfg)({"params": adapted}, x))
    out = save_peft_adapter(adapted, lcfg, tmp_path / "a")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(twin.eval(), out).eval()
    assert not [w for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    with torch.no_grad():
        assert_close(theirs(torch.tensor(x)).numpy(), ours)
    with pytest.raises(ValueError, match="or, for another linen model, the full param tree"):
        save_peft_adapter(lora_jax.split(adapted)[0], lcfg, tmp_path / "b")
