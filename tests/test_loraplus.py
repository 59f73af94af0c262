"""LoRA+ against PEFT's create_loraplus_optimizer: same gradients -> same parameters after 3 AdamW steps."""

import numpy as np
import optax
import pytest
import torch

import lora_jax
from lora_jax.interop import load_peft_adapter
from lora_jax.variants.loraplus import loraplus


def test_loraplus_matches_peft_adamw_groups(tiny_checkpoint, tmp_path):
    import peft
    from peft.optimizers import create_loraplus_optimizer

    path, _ = tiny_checkpoint("llama")
    from test_peft_export import hf_base

    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_base(path), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                           use_dora=True, init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "init")
    params, _ = load_peft_adapter(lora_jax.models.from_pretrained(path)[1], str(tmp_path / "init"))
    lora = lora_jax.split_constants(lora_jax.split(params)[0])[0]

    opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1)
    tx = loraplus(lambda lr: optax.adamw(lr, weight_decay=0.1), 1e-2, loraplus_lr_ratio=16.0)
    state = tx.init(lora)
    named = {n: p for n, p in pm.named_parameters() if p.requires_grad}

    def ours_name(n):  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> tree path
        mod, kind = n[len("base_model.model."):].split(".lora_")
        leaf = {"A": "lora_a", "B": "lora_b", "magnitude_vector": "lora_magnitude"}[kind.split(".")[0]]
        return tuple(mod.split(".")) + (leaf,)

    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {}
        for n, p in named.items():
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.grad = torch.tensor(g)
            lora_jax.tree.put(grads, ours_name(n), g.T if p.ndim == 2 else g)
        opt.step()
        updates, state = tx.update(grads, state, lora)
        lora = optax.apply_updates(lora, updates)
    for n, p in named.items():
        mine = np.asarray(lora_jax.tree.get(lora, ours_name(n)))
        np.testing.assert_allclose(mine, p.detach().numpy().T if p.ndim == 2 else p.detach().numpy(), atol=1e-5, rtol=1e-5)  # steps are 1e-2 (A) and 0.16 (B)
    assert len(named) == 2 * 2 * 3  # A, B and m of two modules in two layers all compared
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be a number > 0"):
        loraplus(optax.sgd, 1e-3, 0)


def test_recipe_fields():
    from train.config import load_recipe

    r = load_recipe("recipes/smollm2_default.yaml", ["optim.loraplus_lr_ratio=16", "lora.use_dora=true"])
    assert r.optim.loraplus_lr_ratio == 16.0 and r.lora.to_lora_config().use_dora
    with pytest.raises(ValueError, match="optim.loraplus_lr_ratio must be > 0"):
        load_recipe("recipes/smollm2_default.yaml", ["optim.loraplus_lr_ratio=0"])


def test_train_program_with_loraplus_and_dora_exports_a_peft_dora_adapter(tmp_path, capsys):
    """`lora-jax train ... optim.loraplus_lr_ratio=16 lora.use_dora=true`: runs, and PEFT loads the DoRA adapter."""
    import json

    from test_train_cli import args, run_cli
    from train.testing import make_tiny_model

    tiny = make_tiny_model(str(tmp_path / "tiny"))
    out = tmp_path / "run"
    rc, _, err = run_cli(args(tiny, out, "max_steps=2", "optim.lr=5e-2", "optim.loraplus_lr_ratio=16", "lora.use_dora=true",
                              "data.max_eval_examples=4", "max_new_tokens=0"), capsys)
    assert rc == 0, err
    cfg = json.load(open(out / "adapter" / "adapter_config.json"))
    assert cfg["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "numpy") as f:
        assert any(k.endswith("lora_magnitude_vector") for k in f.keys())
