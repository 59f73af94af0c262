"""DoRA (`use_dora`) against PEFT's DoraLinearLayer: logits, gradients (detached norm), merge,
export/import of `lora_magnitude_vector`, scanned layers and the magnitude's sharding spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lora_jax
from lora_jax.interop import load_peft_adapter, save_peft_adapter
from parity import IDS, assert_close, hf_base, ours, peft_logits

LCFG = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_dora=True)


def _perturb_magnitudes(params, seed=3):
    """m <- m · (1 + 0.2·noise): a trained-looking magnitude, different from the current norm."""
    rng = np.random.default_rng(seed)
    return lora_jax.tree.map_paths(
        lambda p, x: x * (1 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1] == "lora_magnitude" else x, params)


@pytest.mark.parametrize("scan", [False, True])
def test_dora_forward_merge_export_import_match_peft(scan, tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint("llama")
    model, base, params = ours(path, LCFG, scan_layers=scan)
    params = _perturb_magnitudes(params)
    node = params["model"]["layers"]["self_attn" if scan else "0"]
    assert "lora_magnitude" in (node if scan else node["self_attn"])["q_proj"]
    out = save_peft_adapter(params, LCFG, tmp_path / "a", model_config=model.cfg)
    mine = np.asarray(model.apply({"params": params}, IDS)[0])
    theirs = peft_logits(path, out)
    assert np.max(np.abs(mine - np.asarray(model.apply({"params": lora_jax.merge(params)}, IDS)[0]))) < 1e-4
    assert_close(mine, theirs)
    # plain LoRA with the same A/B differs: the magnitude matters
    plain = lora_jax.tree.filter_tree(params, lambda p: p[-1] != "lora_magnitude")
    assert np.max(np.abs(mine - np.asarray(model.apply({"params": plain}, IDS)[0]))) > 1e-3
    back, cfg = load_peft_adapter(base, out)
    assert cfg.use_dora
    assert_close(np.asarray(model.clone(lora=cfg).apply({"params": back}, IDS)[0]), mine, 1e-6)


def test_dora_gradients_match_peft_detached_norm(tiny_checkpoint, tmp_path):
    """d(sum(logits·w))/d(A, B, m) equal PEFT's autograd gradients: same detached weight norm."""
    path, _ = tiny_checkpoint("llama")
    cfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj",), use_dora=True)
    model, _, params = ours(path, cfg)
    params = _perturb_magnitudes(params)
    out = save_peft_adapter(params, cfg, tmp_path / "a", model_config=model.cfg)
    w = np.random.default_rng(5).standard_normal((2, 8, 96)).astype(np.float32)
    lora, frozen = lora_jax.split(params)
    _, grads = lora_jax.lora_value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, IDS)[0] * w))(lora, frozen)

    from peft import PeftModel

    pm = PeftModel.from_pretrained(hf_base(path), out, is_trainable=True)
    (pm(torch.tensor(IDS, dtype=torch.long)).logits * torch.tensor(w)).sum().backward()
    named = dict(pm.named_parameters())
    for layer in ("0", "1"):
        g = grads["model"]["layers"][layer]["self_attn"]["q_proj"]
        pre = f"base_model.model.model.layers.{layer}.self_attn.q_proj."
        np.testing.assert_allclose(g["lora_a"], named[pre + "lora_A.default.weight"].grad.numpy().T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(g["lora_b"], named[pre + "lora_B.default.weight"].grad.numpy().T, atol=2e-4, rtol=1e-3)
        np.testing.assert_allclose(g["lora_magnitude"], named[pre + "lora_magnitude_vector.default.weight"].grad.numpy(),
                                   atol=2e-4, rtol=1e-3)


def test_dora_init_is_peft_norm_and_leaves_output_unchanged():
    kernel = jax.random.normal(jax.random.key(0), (3, 16, 8))  # stacked [L, in, out]
    layouts = {"layers.q": lora_jax.KernelLayout(stack=1, n_in=1)}  # a 3-axis kernel outside our models: never guessed
    p = lora_jax.inject({"layers": {"q": {"kernel": kernel}}}, lora_jax.LoraConfig(r=2, target_modules=["q"], use_dora=True),
                        jax.random.key(1), layouts=layouts)
    np.testing.assert_allclose(p["layers"]["q"]["lora_magnitude"], np.linalg.norm(np.asarray(kernel), axis=1), rtol=1e-6)
    assert lora_jax.count_parameters(p)[0] == 3 * (16 * 2 + 2 * 8 + 8)  # A, B and m are trainable
    with pytest.raises(ValueError, match="DoRA, whose merge cannot be undone"):
        lora_jax.unmerge(lora_jax.merge(p, layouts=layouts), lora_jax.split(p)[0], layouts=layouts)


def test_dora_magnitude_spec_follows_the_kernel_output_axes():
    from jax.sharding import PartitionSpec as P

    from lora_jax import sharding as shd
    from lora_jax.models import ModelConfig, build_model

    model = build_model(ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8), scan_layers=True)
    shapes = jax.eval_shape(lambda: lora_jax.inject(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
                                                    lora_jax.LoraConfig(r=2, target_modules="all-linear", use_dora=True),
                                                    jax.random.key(1)))
    specs = shd.param_specs(shapes, shd.default_rules("llama"))
    q = specs["model"]["layers"]["self_attn"]["q_proj"]
    o = specs["model"]["layers"]["self_attn"]["o_proj"]
    assert q["lora_magnitude"] == P(None, q["kernel"][2]) and o["lora_magnitude"] == P(None, o["kernel"][2])
    assert q["kernel"][2] is not None or o["kernel"][2] is not None  # at least one output axis is sharded


def test_dora_dropout_follows_peft_base_term_on_dropped_input():
    """PEFT (DoraLinearVariant.forward, training with dropout): y = xW + b + (f-1)·(x_d W) + f·s·x_d A B.
    x_d is recovered from the same rng with an identity adapter (the dropout mask depends only on rng and shape)."""
    from lora_jax.layers import Dense

    d = 8
    cfg = lora_jax.LoraConfig(r=d, alpha=d, dropout=0.5, target_modules=["q"], use_dora=True)
    layer = Dense(d, name="q", lora=cfg)
    x = jax.random.normal(jax.random.key(0), (3, d))
    k = jax.random.split(jax.random.key(1), 4)
    w, bias = jax.random.normal(k[0], (d, d)), jax.random.normal(k[1], (d,))
    a, b = 0.3 * jax.random.normal(k[2], (d, d)), 0.3 * jax.random.normal(k[3], (d, d))
    m = jnp.linalg.norm(w + a @ b, axis=0) * jnp.linspace(0.5, 1.5, d)
    rngs = {"dropout": jax.random.key(7)}
    p = {"kernel": w, "bias": bias, "lora_a": a, "lora_b": b, "lora_scale": jnp.float32(1.0), "lora_magnitude": m}
    y = layer.apply({"params": p}, x, rngs=rngs)
    eye = {"kernel": jnp.zeros((d, d)), "lora_a": jnp.eye(d), "lora_b": jnp.eye(d), "lora_scale": jnp.float32(1.0)}
    x_d = Dense(d, use_bias=False, name="q", lora=cfg).apply({"params": eye}, x, rngs=rngs)
    assert 0 < int((x_d == 0).sum()) < x_d.size  # some inputs dropped
    f = m / jnp.linalg.norm(w + a @ b, axis=0)
    expected = x @ w + bias + (f - 1) * (x_d @ w) + f * (x_d @ a @ b)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dora_on_a_sharded_mesh_matches_one_device(tmp_path):
    """4 host devices (fsdp 2 x tensor 2), scanned layers: same logits and magnitude gradients as one device."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = tmp_path / "out.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, os.path.join(root, "tests", "dora_sharding_worker.py"), str(out)], env=env, check=True, timeout=600)
    r = json.load(open(out))
    assert r["err"] < 1e-5 and r["grad_err"] <= 1e-5 * max(1.0, r["grad_max"]), r
    assert r["mag_spec"] != "PartitionSpec()" and r["mag_spec"].endswith(r["kernel_spec"].split(",")[-1].strip(" )") + ")"), r
