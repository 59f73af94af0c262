"""The cuDNN path on CPU: our masks -> cuDNN's arguments, checked against an emulator of cuDNN's
documented semantics (tests/cudnn_emulator.py, which feeds the arguments through jax's own
preprocessing); then the whole path (and a bf16 model with attention="cudnn", as on an H100)
with the emulated kernel in place of cuDNN equals the reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.models import ModelConfig, attn_cudnn, attn_dispatch, build_model
from lora_jax.models.attn_cudnn import cudnn, packed_layout
from lora_jax.models.attn_reference import reference
from lora_jax.models.masks import AttentionMask, dense

from attention_cases import assert_close, layouts, make_mask, outputs_and_grads, qkv

pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo", reason="this jax has no cuDNN attention module")
from cudnn_emulator import MaskType, emulated_allowed, install  # noqa: E402

H100 = {"gpu_capability": (9, 0), "cudnn_version": 90800, "cudnn_packed_api": True, "splash_api": True}


def random_segments(rng, rows: int, t: int) -> np.ndarray:
    """Rows of contiguous runs of increasing ids, with padding before, between and after them."""
    out = np.zeros((rows, t), np.int32)
    for r in range(rows):
        pos, seg = int(rng.integers(0, 3)), 1
        while pos < t:
            n = int(rng.integers(1, 6))
            out[r, pos : pos + n] = seg
            seg += 1
            pos += n + int(rng.integers(0, 2) * rng.integers(1, 3))  # sometimes a padding gap
        if rng.random() < 0.3:
            out[r, int(rng.integers(t // 2, t)) :] = 0  # right padding
    return out


def test_packed_layout_of_the_mask_kinds():
    lens, offs, ok = packed_layout(jnp.asarray(layouts(12)["packed"]), 4)
    assert lens.tolist() == [[4, 2, 4, -1], [12, -1, -1, -1], [4, 7, -1, -1]]
    assert offs.tolist() == [[0, 4, 6, -1, -1], [0, -1, -1, -1, -1], [1, 5, -1, -1, -1]]
    assert ok.tolist() == [True, True, True]
    lens, offs, ok = packed_layout(jnp.asarray(layouts(12)["left_padding"]), 2)
    assert lens.tolist() == [[12, -1], [8, -1], [2, -1]] and offs.tolist() == [[0, -1, -1], [4, -1, -1], [10, -1, -1]]
    lens, offs, ok = packed_layout(jnp.array([[0, 0, 0], [1, 2, 3], [1, 0, 1], [2, 2, 1]]), 2)
    assert lens.tolist() == [[-1, -1], [1, 1], [1, 1], [2, 1]]
    assert ok.tolist() == [True, False, False, True]  # no tokens; 3 runs > 2 slots; id 1 split; ids need not increase


@pytest.mark.parametrize("m", [None, 3], ids=["M=T", "M=3"])
def test_emulated_cudnn_sees_exactly_the_reference_mask(m):
    t = 16
    seg = jnp.asarray(random_segments(np.random.default_rng(0), 24, t))
    lens, offs, ok = packed_layout(seg, m or t)
    q = jnp.zeros((24, t, 4, 8), jnp.bfloat16)
    k = jnp.zeros((24, t, 2, 8), jnp.bfloat16)
    allowed, invalid = emulated_allowed(q, k, MaskType.PADDING_CAUSAL, lens, lens, offs, offs)
    assert not bool(invalid)
    real = np.asarray(seg != 0)
    want = np.asarray(dense(AttentionMask(segment_ids=seg), t))[:, 0]
    got = np.asarray(allowed)
    rows = np.asarray(ok)
    assert rows.sum() == 24 if m is None else 3 <= rows.sum() < 24  # with 3 slots only some rows fit
    for r in np.flatnonzero(rows):
        np.testing.assert_array_equal(got[r][real[r]], want[r][real[r]], err_msg=f"row {r}: {seg[r].tolist()}")
        assert not got[r][~real[r]].any()  # padding queries see nothing (their output is zero)


def test_the_emulator_catches_the_conventions_that_failed_on_a_gpu():
    """[B, M] offsets, or 0 for absent lengths, silently gave wrong outputs on an H100 (notes)."""
    seg = jnp.asarray(layouts(12)["packed"])
    lens, offs, _ = packed_layout(seg, 3)
    q = jnp.zeros((3, 12, 2, 8), jnp.bfloat16)
    want = np.asarray(dense(AttentionMask(segment_ids=seg), 12))[:, 0] & np.asarray(seg != 0)[:, :, None]
    good, _ = emulated_allowed(q, q, MaskType.PADDING_CAUSAL, lens, lens, offs, offs)
    np.testing.assert_array_equal(np.asarray(good) & np.asarray(seg != 0)[:, :, None], want)
    zero_lens = jnp.where(lens < 0, 0, lens)
    bad, invalid = emulated_allowed(q, q, MaskType.PADDING_CAUSAL, zero_lens, zero_lens, offs, offs)
    assert bool(invalid) or not np.array_equal(np.asarray(bad) & np.asarray(seg != 0)[:, :, None], want)
    with pytest.raises(AssertionError, match=r"offsets \[B, M \+ 1\]"):
        emulated_allowed(q, q, MaskType.PADDING_CAUSAL, lens, lens, offs[:, :3], offs[:, :3])


@pytest.mark.parametrize("windows", [[(None, None)], [(5, None)], [(5, True), (5, False)]],
                         ids=["no_window", "window", "window_per_layer"])
def test_cudnn_path_with_emulated_kernel_equals_reference(windows, monkeypatch):
    install(monkeypatch)
    q, k, v, w = qkv(24, dtype=jnp.bfloat16)
    for (kind, seg), window in itertools.product(layouts(24).items(), windows):
        mask = make_mask(seg, *window)
        try:
            assert_close(outputs_and_grads(cudnn, q, k, v, w, mask, 0.25),
                         outputs_and_grads(reference, q, k, v, w, mask, 0.25), 3e-2)
        except AssertionError as e:
            raise AssertionError(f"{kind} {window}: {e}") from None


def test_rows_with_more_examples_than_fast_slots_take_the_exact_branch(monkeypatch):
    install(monkeypatch)
    monkeypatch.setattr(attn_cudnn, "FAST_SEGMENTS", 2)  # the packed layout rows hold up to 3 examples
    q, k, v, w = qkv(24, dtype=jnp.bfloat16)
    mask = make_mask(layouts(24)["packed"])
    assert_close(outputs_and_grads(cudnn, q, k, v, w, mask, 0.25), outputs_and_grads(reference, q, k, v, w, mask, 0.25),
                 3e-2)


def test_a_segment_split_in_two_runs_gives_nan_not_a_wrong_answer(monkeypatch):
    install(monkeypatch)
    q, k, v, _ = qkv(24, dtype=jnp.bfloat16)
    seg = np.asarray(layouts(24)["packed"]).copy()
    seg[1, 10:12] = 0  # row 1's only example now has a hole: cuDNN's layout cannot say "the same example"
    out = np.asarray(cudnn(q, k, v, make_mask(seg), 0.25), np.float32)
    assert np.isnan(out[1][seg[1] != 0]).all()
    assert np.isfinite(out[[0, 2]]).all()


def test_cudnn_refuses_what_it_cannot_serve():
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        cudnn(q, q, q, AttentionMask(), 1.0, softcap=5.0)
    with pytest.raises(NotImplementedError, match="KV cache"):
        cudnn(q, q, q, AttentionMask(kv_valid=jnp.ones((1, 4), bool), q_start=jnp.int32(0)), 1.0)


@pytest.mark.slow
def test_bf16_model_with_cudnn_attention_as_on_an_h100(monkeypatch):
    """The dispatcher sees an H100; cuDNN is the emulator. Logits and LoRA gradients = reference."""
    install(monkeypatch)
    monkeypatch.setattr(attn_dispatch, "current_platform", lambda: "gpu")
    monkeypatch.setattr(attn_dispatch, "runtime_facts", lambda platform: H100)
    cfg = ModelConfig("llama", 64, 32, 64, 2, 4, 2, 16, max_position_embeddings=64)
    lcfg = lora_jax.LoraConfig(r=2, target_modules="all-linear")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 24)), jnp.int32)
    seg = jnp.asarray(layouts(24)["packed"])
    ref = build_model(cfg, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, lora=lcfg, attention="reference")
    params = lora_jax.inject(ref.init(jax.random.key(0), ids)["params"], lcfg, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype) if p[-1].key == "lora_b" else x,
        params)
    lora, frozen = lora_jax.split(params)
    real = (seg != 0)[..., None]

    def run(model):
        def loss(lo):
            logits = model.apply({"params": lora_jax.combine(lo, frozen)}, ids, seg)[0].astype(jnp.float32)
            return jnp.sum(jnp.where(real, logits, 0.0) ** 2), logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(lora)
        return np.asarray(jnp.where(real, logits, 0.0)), [np.asarray(x, np.float32) for x in jax.tree.leaves(g)]

    chosen = attn_dispatch.plan("auto", attn_dispatch.Call("gpu", "bfloat16", 16, 4, 2, 24, 24, "segments", **H100))[0]
    assert chosen[0] == "cudnn"
    (logits, grads), (ref_logits, ref_grads) = run(ref.clone(attention="auto")), run(ref)
    assert np.abs(logits - ref_logits).max() <= 5e-2 * np.abs(ref_logits).max()
    for a, b in zip(grads, ref_grads):
        assert np.abs(a - b).max() <= 5e-2 * max(1.0, np.abs(b).max())
