"""QLoRA's frozen base: NF4 / int8 quantization against an independent reference and against
bitsandbytes itself, the on-the-fly dequantizing forward, the train step, its memory plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import sharding as shd
from lora_jax import training
from lora_jax.models import ModelConfig, build_model
from lora_jax.quant import QuantConfig, dequantize, dequantize_t, quantize_kernel

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

# QLoRA's NF4 levels written out from the paper's construction (quantiles of N(0,1), offset 0.9677083),
# rounded as float32; the reference below uses these, never the library's table.
NF4_REF = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0], np.float32)


def nearest(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest level (ties to the lower), by brute-force distance: no midpoints."""
    d = np.abs(x[..., None].astype(np.float64) - code.astype(np.float64))
    return np.argmin(d, axis=-1)  # argmin returns the first (lower) index on ties


def reference_nf4_dq(w_t: np.ndarray, bs: int, code8: np.ndarray) -> np.ndarray:
    """Independent NF4 + double quantization round trip of one weight [out, in], in float64 math
    where bitsandbytes' float32 results are exact, element by element (no packing, no library code)."""
    out, n_in = w_t.shape
    blocks = w_t.reshape(-1, bs).astype(np.float32)
    absmax = np.abs(blocks).max(1).astype(np.float32)
    scaled = np.clip(blocks * (np.float32(1) / absmax)[:, None], -1, 1).astype(np.float32)
    q4 = nearest(scaled, NF4_REF)
    offset = np.float32(np.mean(absmax.astype(np.float64)))
    centered = (absmax - offset).astype(np.float32)
    deq_absmax = np.empty_like(absmax)
    for s in range(0, centered.size, 256):
        chunk = centered[s:s + 256]
        a2 = np.float32(np.abs(chunk).max())
        q8 = nearest(np.clip(chunk * (np.float32(1) / a2), -1, 1).astype(np.float32), code8)
        deq_absmax[s:s + 256] = (code8[q8] * a2).astype(np.float32) + offset
    return (NF4_REF[q4] * deq_absmax[:, None]).astype(np.float32).reshape(out, n_in)


def weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.01, 1.0, shape[:-1] + (1,))).astype(np.float32)


def test_code_books_are_bitsandbytes():
    assert np.array_equal(lora_jax.quant.NF4, bnbf.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(lora_jax.quant.NF4, NF4_REF)
    for signed in (True, False):
        ours, theirs = lora_jax.quant.dynamic_map(signed), bnbf.create_dynamic_map(signed=signed).numpy()
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - theirs.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2 and np.all(np.diff(ours) > 0)


def test_nf4_double_quant_equals_an_independent_reference_and_its_bound():
    kernel = weights((2, 384, 96))  # stacked: two layers, each quantized on its own; 576 blocks -> 3 nested blocks
    q = quantize_kernel(kernel, QuantConfig("nf4", 64, True))
    assert q.codes.shape == (2, 96, 192) and q.absmax.dtype == np.uint8 and q.nested_absmax.shape == (2, 3)
    deq = np.asarray(jax.jit(dequantize)(q))
    for layer in range(2):
        ref = reference_nf4_dq(kernel[layer].T, 64, lora_jax.quant.dynamic_map(True))
        np.testing.assert_array_equal(deq[layer], ref.T)
    # NF4's bound: half the widest gap between levels times the block's absmax (+ the 8-bit scale error)
    absmax = np.abs(kernel.transpose(0, 2, 1).reshape(2, 96, 6, 64)).max(-1)
    half_gap = np.diff(NF4_REF).max() / 2
    err = np.abs(deq - kernel).transpose(0, 2, 1).reshape(2, 96, 6, 64).max(-1)
    assert np.all(err <= absmax * half_gap * 1.01 + 0.01 * absmax.max())
    assert np.abs(deq - kernel).mean() < 0.06 * np.abs(kernel).mean() * 2


def test_int8_round_trip_within_half_a_step():
    kernel = weights((256, 48), seed=1)
    for dq in (False, True):
        q = quantize_kernel(kernel, QuantConfig("int8", 64, dq))
        assert q.codes.dtype == np.int8
        deq = np.asarray(dequantize(q))
        blocks_t = kernel.T.reshape(48, 4, 64)
        absmax = np.abs(blocks_t).max(-1, keepdims=True)
        ref = (np.rint(np.clip(blocks_t / absmax, -1, 1) * 127) / 127 * absmax).reshape(48, 256).T
        tol = 0 if not dq else np.abs(absmax).max() * 0.02  # double quantization rounds the scales too
        assert np.abs(deq - ref).max() <= tol + 1e-6
        scale_err = 0.02 * absmax.max() if dq else 0.0  # 8-bit dynamic codes of (absmax - offset): < 1% of their range
        assert np.abs(deq - kernel).max() <= absmax.max() / 254 * 1.0001 + scale_err


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_bitsandbytes_quantize_4bit_and_dequantizes_its_state_bit_for_bit(double_quant, dtype):
    w_t = weights((96, 768), seed=2)
    t = torch.from_numpy(w_t).to(getattr(torch, dtype))
    packed, state = bnbf.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed, state).float().numpy()
    ours = quantize_kernel(t.float().numpy().T.astype(jnp.dtype(dtype)), QuantConfig("nf4", 64, double_quant))
    np.testing.assert_array_equal(ours.codes.reshape(-1), packed.numpy().reshape(-1))  # same NF4 codes
    if double_quant:  # bitsandbytes' own scales (its offset is a float32 sum, ours the exact mean)
        ours = ours.replace(absmax=state.absmax.numpy().reshape(96, 12), nested_absmax=state.state2.absmax.numpy(),
                            nested_code=state.state2.code.numpy(), offset=np.float32(state.offset.item()))
    got = jax.jit(lambda q: dequantize_t(q))(ours)  # under jit: XLA must not fuse the scales into an FMA
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected)


def test_quantize_keeps_embeddings_norms_and_head_and_skips_by_pattern():
    model = build_model(ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8))
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    q = lora_jax.quantize(params, "nf4", block_size=32)
    assert lora_jax.quant.is_quantized(q["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"])
    assert isinstance(q["lm_head"]["kernel"], np.ndarray) and isinstance(q["model"]["embed_tokens"]["embedding"], np.ndarray)
    q_all = lora_jax.quantize(params, "nf4", block_size=32, skip_modules=())
    assert lora_jax.quant.is_quantized(q_all["lm_head"]["kernel"])
    q_attn = lora_jax.quantize(params, "nf4", block_size=32, skip_modules=r".*mlp.*|lm_head")
    assert not lora_jax.quant.is_quantized(q_attn["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"])
    assert lora_jax.count_parameters(q) == lora_jax.count_parameters(params)
    with pytest.raises(ValueError, match="not a multiple of block_size=64"):
        lora_jax.quantize(params, "nf4", block_size=64)
    with pytest.raises(ValueError, match="scheme 'fp4' is not supported"):
        lora_jax.quantize(params, "fp4")


# -- the model with a quantized base ----------------------------------------------------------------
CFG = ModelConfig("llama", 64, 64, 128, 2, 4, 2, 16)
LORA = lora_jax.LoraConfig(r=4, alpha=8, target_modules="all-linear")


def qlora_params(scan: bool, remat=None, scheme="nf4"):
    model = build_model(CFG, scan_layers=scan, lora=LORA, remat=remat)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    params = lora_jax.inject(lora_jax.quantize(params, scheme, block_size=16), LORA, jax.random.key(1))
    lora, frozen = lora_jax.split(params)
    lora = jax.tree.map(lambda a: a + 0.05, lora)  # nonzero B: the adapters take part
    return model, lora, frozen


@pytest.mark.parametrize("scan,remat,scheme", [(True, None, "nf4"), (False, None, "int8"), (True, "full", "nf4")])
def test_forward_and_gradients_equal_the_dequantized_base(scan, remat, scheme):
    model, lora, frozen = qlora_params(scan, remat, scheme)
    plain = lora_jax.quant.dequantize_params(frozen, "float32")
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)

    def loss(lo, fr):
        return model.apply({"params": lora_jax.combine(lo, fr)}, ids)[0].astype(jnp.float32).std()

    (l1, g1), (l2, g2) = jax.value_and_grad(loss)(lora, frozen), jax.value_and_grad(loss)(lora, plain)
    assert abs(float(l1) - float(l2)) < 1e-6
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_generation_on_a_quantized_base_equals_the_dequantized_one():
    model, lora, frozen = qlora_params(True)
    prompt = jnp.array([[3, 5, 7, 9]])
    a = lora_jax.generate(model, lora_jax.combine(lora, frozen), prompt, max_new_tokens=6)
    b = lora_jax.generate(model, lora_jax.combine(lora, lora_jax.quant.dequantize_params(frozen, "float32")), prompt,
                          max_new_tokens=6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _step_and_state(model, lora, frozen, tx):
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    specs = shd.param_specs(lora_jax.combine(lora, frozen), shd.default_rules("llama"), mesh, min_size=0)
    state = training.init_train_state(lora, tx, jax.random.key(7), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    return training.make_train_step(model, tx, mesh, specs, schedule=1e-2), state, mesh, specs


def _batches(n, vocab=64):
    rng = np.random.default_rng(0)
    return [{"input_ids": (ids := rng.integers(0, vocab, (1, 4, 16)).astype(np.int32)), "labels": ids} for _ in range(n)]


def test_qlora_step_changes_only_lora_and_resume_is_bitwise(tmp_path):
    model, lora, frozen = qlora_params(True)
    frozen_before = jax.tree.map(np.array, frozen)
    tx = lora_jax.quant.adamw_8bit(1e-2, min_8bit_size=64)
    step, state, mesh, specs = _step_and_state(model, lora, frozen, tx)
    lora0 = jax.tree.map(np.array, state["lora"])
    batches = _batches(4)
    state, _ = step(state, frozen, batches[0])
    state, _ = step(state, frozen, batches[1])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)))
    trained = lambda tree: jax.tree.leaves(lora_jax.split_constants(tree)[0])  # noqa: E731  (not the scales)
    assert all(not np.array_equal(a, b) for a, b in zip(trained(lora0), trained(state["lora"])))
    with training.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state)
        ckpt.wait()
        target = training.abstract_state(state, mesh, lora_jax.split(specs)[0])
        straight = state
        for b in batches[2:]:
            straight, m_straight = step(straight, frozen, b)
        resumed, _ = ckpt.restore(target=target)
    for b in batches[2:]:
        resumed, m_resumed = step(resumed, frozen, b)
    assert float(m_straight["loss"]) == float(m_resumed["loss"])
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_memory_plan_keeps_no_dequantized_model():
    """Weights dominate this model: the compiled QLoRA step's temporaries stay far below the bf16
    model (they hold one layer's float weights at a time, activations and a copy of the codes the
    scan keeps for its backward)."""
    cfg = ModelConfig("llama", 128, 256, 1024, 16, 4, 2, 64)
    model = build_model(cfg, dtype="float32", param_dtype="bfloat16", scan_layers=True, lora=LORA, remat="save_projections")
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"])
    bf16_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    lora, frozen = lora_jax.split(lora_jax.inject(lora_jax.quantize(params, "nf4"), LORA, jax.random.key(1)))
    batch = {"input_ids": np.zeros((1, 2, 16), np.int32), "labels": np.zeros((1, 2, 16), np.int32)}

    step, state, _, _ = _step_and_state(model, lora, frozen, optax.adamw(1e-3))
    ours = step.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    # Keeping every layer's dequantized float32 weights would cost 2x the bf16 model by itself.
    assert ours < 0.5 * bf16_bytes, (ours, bf16_bytes)


@pytest.mark.slow
def test_sharded_qlora_on_8_devices_equals_one_device(tmp_path):
    import json
    import os
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve().parent
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {flags}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, str(here / "quant_sharding_worker.py"), str(out)], env=env, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["n_devices"] == 8
    for name in ("2data4fsdp", "2fsdp4tensor"):
        rec = res[name]
        assert rec["frozen_identical"] and rec["loss_rel"] < 1e-5 and rec["lora_rel"] < 1e-4, (name, rec)
    # down_proj [L, 64, 32] kernel: codes [L, out=32, in/2=32], split like the kernel (in by 'tensor' there)
    assert res["2fsdp4tensor"]["codes_local"] == [[2, 16, 8]], res["2fsdp4tensor"]
    assert res["1"]["codes_local"] == [[2, 32, 32]]
