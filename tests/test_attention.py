"""The attention entry point: every implementation that runs on CPU ("xla"; "splash" in Pallas
interpret mode) equals the reference — outputs on real query rows and gradients w.r.t. q, k, v
and the LoRA leaves — for causal, left/right padding, packed rows, sliding windows (static and
per-layer at run time), GQA, soft-capping, fp32 and bf16; explicit choices that cannot serve a
call fail with one line; "auto" logs its choice once."""

from __future__ import annotations

import itertools
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.errors import UserError
from lora_jax.models import ModelConfig, attn_dispatch, build_model, init_cache
from lora_jax.models.attn_reference import reference, xla
from lora_jax.models.attn_splash import splash
from attention_cases import assert_close, layouts, make_mask, outputs_and_grads, qkv

HERE = pathlib.Path(__file__).resolve().parent
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"  # as test_sharding
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
WINDOWS = {"no_window": [(None, None)], "window": [(5, None)],
           "window_per_layer": [(5, True), (5, False)]}  # the layer's flag known only at run time (nn.scan)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", WINDOWS)
def test_xla_equals_reference(window, dtype):
    q, k, v, w = qkv(24, dtype=dtype)
    for (kind, seg), win in itertools.product(layouts(24).items(), WINDOWS[window]):
        mask = make_mask(seg, *win)
        try:
            assert_close(outputs_and_grads(xla, q, k, v, w, mask, 0.25),
                         outputs_and_grads(reference, q, k, v, w, mask, 0.25), TOL[dtype])
        except AssertionError as e:
            raise AssertionError(f"{kind} {win}: {e}") from None


@pytest.mark.slow
@pytest.mark.parametrize("window,softcap,dtype", [
    ("no_window", None, jnp.float32), ("window", 3.0, jnp.float32), ("window_per_layer", None, jnp.float32),
    ("no_window", None, jnp.bfloat16)], ids=["fp32", "fp32-window-softcap", "fp32-window-per-layer", "bf16"])
def test_splash_in_interpret_mode_equals_reference(window, softcap, dtype):
    q, k, v, w = qkv(128, dtype=dtype)
    for (kind, seg), win in itertools.product(layouts(128).items(), WINDOWS[window]):
        mask = make_mask(seg, *win)
        try:
            assert_close(outputs_and_grads(splash, q, k, v, w, mask, 0.25, softcap),
                         outputs_and_grads(reference, q, k, v, w, mask, 0.25, softcap), TOL[dtype])
        except AssertionError as e:
            raise AssertionError(f"{kind} {win}: {e}") from None


def test_packed_rows_never_attend_across_examples():
    """A key of another example (or padding) changes nothing for a query: perturb it, compare."""
    seg = layouts(24)["packed"]
    q, k, v, _ = qkv(24)
    mask = make_mask(seg)
    base = xla(q, k, v, mask, 0.25)
    other = jnp.asarray(seg != seg[:, 5:6])[:, :, None, None]  # tokens outside the example of position 5
    moved = xla(q, jnp.where(other, k + 3.0, k), jnp.where(other, v - 2.0, v), mask, 0.25)
    np.testing.assert_allclose(np.asarray(moved[:, 5]), np.asarray(base[:, 5]), atol=1e-6)


def _tiny(dtype, sliding=(False, True)):
    return ModelConfig("qwen2", 64, 32, 64, 2, 4, 2, 16, attention_bias=True, sliding_window=40, sliding_layers=sliding,
                       max_position_embeddings=256)


def _lora_grads(model, params, ids, seg, positions):
    cfg = lora_jax.LoraConfig(r=2, target_modules="all-linear")
    model = model.clone(lora=cfg)
    lora, frozen = lora_jax.split(params)
    real = (jnp.ones(ids.shape, bool) if seg is None else seg != 0)[..., None]

    def loss(lo):
        logits = model.apply({"params": lora_jax.combine(lo, frozen)}, ids, seg, positions)[0].astype(jnp.float32)
        return jnp.sum(jnp.where(real, logits, 0.0) ** 2), logits

    (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
    return np.asarray(jnp.where(real, logits, 0.0)), [np.asarray(x, np.float32) for x in jax.tree.leaves(g)]


def _model_case(impl, t, dtype, kind, scan):
    cfg = _tiny(dtype)
    lcfg = lora_jax.LoraConfig(r=2, target_modules="all-linear")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, t)), jnp.int32)
    ref_model = build_model(cfg, dtype=dtype, scan_layers=scan, attention="reference")
    params = lora_jax.inject(ref_model.init(jax.random.key(0), ids)["params"], lcfg, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(  # nonzero B: the A gradients are nonzero too
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype) if p[-1].key == "lora_b" else x,
        params)
    seg = layouts(t)[kind]
    seg = None if seg is None else jnp.asarray(seg)
    positions = None
    if kind == "packed":  # positions restart per example, as train.data writes them
        s = np.asarray(seg)
        positions = jnp.asarray(np.stack([np.concatenate([np.arange((r == i).sum()) for i in
                                                          sorted(set(r.tolist()), key=r.tolist().index)]) for r in s]))
    got = _lora_grads(build_model(cfg, dtype=dtype, scan_layers=scan, attention=impl), params, ids, seg, positions)
    want = _lora_grads(ref_model, params, ids, seg, positions)
    return got, want


@pytest.mark.parametrize("kind,dtype,scan", [("packed", "float32", True)])
def test_model_with_xla_attention_equals_reference_logits_and_lora_grads(kind, dtype, scan):
    (logits, grads), (ref_logits, ref_grads) = _model_case("xla", 48, dtype, kind, scan)
    tol = 1e-4 if dtype == "float32" else 5e-2
    assert np.abs(logits - ref_logits).max() <= tol * np.abs(ref_logits).max()
    for a, b in zip(grads, ref_grads):
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())
    assert max(np.abs(b).max() for b in ref_grads) > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype,scan", [("left_padding", "bfloat16", False)])
def test_model_with_splash_attention_equals_reference_logits_and_lora_grads(kind, dtype, scan):
    (logits, grads), (ref_logits, ref_grads) = _model_case("splash", 128, dtype, kind, scan)
    tol = 1e-4 if dtype == "float32" else 5e-2
    assert np.abs(logits - ref_logits).max() <= tol * np.abs(ref_logits).max()
    for a, b in zip(grads, ref_grads):
        assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def test_explicit_choices_that_cannot_serve_a_call_fail_with_one_line():
    ids = jnp.zeros((1, 8), jnp.int32)
    cfg = _tiny("float32")
    with pytest.raises(UserError, match=r"attention='cudnn' cannot serve .*needs an NVIDIA GPU \(platform is cpu\)"):
        build_model(cfg, attention="cudnn").init(jax.random.key(0), ids)
    with pytest.raises(UserError, match="needs a sequence length divisible by 128, got 8"):
        build_model(cfg, attention="splash").init(jax.random.key(0), ids)
    with pytest.raises(UserError, match="'flash' is not an implementation"):
        build_model(cfg, attention="flash")
    model = build_model(cfg, attention="splash")  # KV-cache calls (generation) run the reference path
    params = build_model(cfg).init(jax.random.key(0), ids)["params"]
    cache = init_cache(cfg, 1, 16)
    got = model.apply({"params": params}, ids, None, None, cache)[0]
    want = build_model(cfg, attention="reference").apply({"params": params}, ids, None, None, cache)[0]
    np.testing.assert_array_equal(got, want)


def test_auto_logs_its_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(attn_dispatch, "_LOGGED", set())  # earlier tests in this process logged their calls
    cfg = _tiny("float32", sliding=(False, False))
    model = build_model(cfg)
    ids = jnp.zeros((2, 8), jnp.int32)
    with caplog.at_level(logging.INFO, logger="lora_jax.attention"):
        params = model.init(jax.random.key(0), ids)["params"]
        model.apply({"params": params}, ids, jnp.ones((2, 8), jnp.int32))
        model.apply({"params": params}, ids, jnp.ones((2, 8), jnp.int32))
    lines = [r.getMessage() for r in caplog.records if "segments mask" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("attention=auto uses reference for (cpu, float32, head_dim 16")
    assert "cudnn: needs an NVIDIA GPU (platform is cpu)" in lines[0]
    assert "splash: needs a sequence length divisible by 128" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_jax.attention"):  # an explicit choice is not explained
        model.clone(attention="reference").apply({"params": params}, ids, jnp.ones((2, 8), jnp.int32))
    assert not caplog.records


@pytest.mark.slow
def test_sharded_steps_with_splash_attention_equal_the_single_device_reference(tmp_path):
    """8 forced CPU devices in a subprocess: 1 device, 2 data x 4 fsdp, 2 fsdp x 4 tensor; splash is
    shard_map'ped over batch and heads on the meshes (and only there). ("reference" and "xla" are
    partitioned by GSPMD like the rest of the step: tests/test_sharding.py.)"""
    out = tmp_path / "attention.json"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "attention_worker.py"), str(out), "splash"], env=env,
                          timeout=1500, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads(out.read_text())
    assert len(rec) == 3
    for name, r in rec.items():
        assert r["loss_diff"] < 1e-5 and r["lora_diff"] < 1e-5, (name, r)
        assert r["lora_change"] > 1e-2  # the steps trained something
        assert r["shard_map"] == (name.startswith("splash/") and not name.endswith("/1")), (name, r)
