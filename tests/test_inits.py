"""PiSSA / pissa_niter_N / OLoRA against PEFT: same residual base and same A·B, and a trained
adapter converted to plain LoRA (PEFT's path_initial_model_for_weight_conversion) reproduces our
logits in a PeftModel on the ORIGINAL base."""

import jax
import numpy as np
import pytest
import torch

import lora_jax
from lora_jax.interop import save_peft_adapter
from lora_jax.variants.inits import convert_to_lora, svd_lowrank
from parity import IDS, assert_close, hf_base, peft_logits, randomize_lora

TARGETS = ("q_proj", "v_proj", "down_proj")
STACKED = {"layers.q": lora_jax.KernelLayout(stack=1, n_in=1)}


@pytest.mark.parametrize("init,scan", [("pissa", False), ("olora", True)])
def test_weight_rewriting_init_matches_peft_and_converts(init, scan, tiny_checkpoint, tmp_path):
    import peft

    path, _ = tiny_checkpoint("llama")
    cfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=init)
    pm = peft.get_peft_model(hf_base(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=init))
    model, base, _ = lora_jax.models.from_pretrained(path, scan_layers=scan)
    model = model.clone(lora=cfg)
    params0 = lora_jax.inject(base, cfg, jax.random.key(0))
    sd = dict(pm.named_parameters())
    for layer in ("0", "1"):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            pre = f"base_model.model.model.layers.{layer}.{mod}."
            node = lora_jax.tree.get(params0, ("model", "layers") + (() if scan else (layer,)) + tuple(mod.split(".")))
            pick = (lambda x: np.asarray(x)[int(layer)]) if scan else np.asarray
            np.testing.assert_allclose(pick(node["kernel"]), sd[pre + "base_layer.weight"].detach().numpy().T, atol=2e-5)
            theirs = 2.0 * (sd[pre + "lora_B.default.weight"] @ sd[pre + "lora_A.default.weight"]).detach().numpy().T
            np.testing.assert_allclose(pick(node["lora_scale"]) * (pick(node["lora_a"]) @ pick(node["lora_b"])), theirs, atol=2e-5)
    assert_close(np.asarray(model.apply({"params": params0}, IDS)[0]), np.asarray(model.apply({"params": base}, IDS)[0]), 1e-4)

    trained = randomize_lora(params0, seed=1, std=0.1)  # "after training"
    with pytest.raises(ValueError, match="convert it first"):
        save_peft_adapter(trained, cfg, tmp_path / "x", model_config=model.cfg)
    converted, ccfg = convert_to_lora(trained, lora_jax.split(params0)[0], cfg)
    out = save_peft_adapter(converted, ccfg, tmp_path / "a", model_config=model.cfg)
    mine = np.asarray(model.apply({"params": trained}, IDS)[0])
    assert np.max(np.abs(mine - np.asarray(model.apply({"params": base}, IDS)[0]))) > 1e-2  # the adapter matters
    assert_close(mine, peft_logits(path, out))


def test_svd_lowrank_is_torchs_algorithm():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    for m in (w, w.T.contiguous()):
        torch.manual_seed(7)
        sketch = torch.randn(min(m.shape), 3)  # torch draws randn(n, q) for the (possibly transposed) tall matrix
        torch.manual_seed(7)
        u, s, v = torch.svd_lowrank(m, q=3, niter=2)
        ju, js, jv = svd_lowrank(jax.numpy.asarray(m.numpy()), 3, 2, sketch=jax.numpy.asarray(sketch.numpy()))
        np.testing.assert_allclose(js, s.numpy(), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ju) * np.asarray(js) @ np.asarray(jv).T, (u * s @ v.T).numpy(), atol=1e-5)


def test_pissa_niter_converges_to_pissa_and_errors():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)  # two stacked layers of rank 3 + noise: a clear spectral gap
    w = jax.numpy.einsum("lir,lro->lio", jax.random.normal(k1, (2, 16, 3)), jax.random.normal(k2, (2, 3, 12)))
    w = w + 0.01 * jax.random.normal(k3, (2, 16, 12))
    full = lora_jax.inject({"layers": {"q": {"kernel": w}}}, lora_jax.LoraConfig(r=3, target_modules=["q"], init="pissa"), jax.random.key(1), layouts=STACKED)
    fast = lora_jax.inject({"layers": {"q": {"kernel": w}}}, lora_jax.LoraConfig(r=3, target_modules=["q"], init="pissa_niter_2"), jax.random.key(1), layouts=STACKED)
    assert float(abs(full["layers"]["q"]["kernel"]).max()) < 0.05  # the residual is the noise
    np.testing.assert_allclose(fast["layers"]["q"]["kernel"], full["layers"]["q"]["kernel"], atol=1e-4)
    with pytest.raises(ValueError, match="pissa_niter_N"):
        lora_jax.LoraConfig(init="pissa_niter_x")
    with pytest.raises(ValueError, match="converts PiSSA/OLoRA adapters"):
        convert_to_lora(full, lora_jax.split(full)[0], lora_jax.LoraConfig(target_modules=["q"]))
    for init in ("pissa", "olora"):  # r > min(in, out): PEFT makes a rank-3 adapter under an r=4 config; refused
        with pytest.raises(ValueError, match="rank 4 exceeds min\\(in, out\\) = 3"):
            lora_jax.inject({"q": {"kernel": np.ones((6, 3), np.float32)}}, lora_jax.LoraConfig(r=4, target_modules=["q"], init=init),
                            jax.random.key(0))
    with pytest.raises(ValueError, match="needs a float kernel"):
        lora_jax.inject(lora_jax.quantize({"layers": {"q": {"kernel": jax.numpy.ones((2, 64, 64))}}}),
                        lora_jax.LoraConfig(r=3, target_modules=["q"], init="olora"), jax.random.key(1), layouts=STACKED)
