"""The compiled train/eval step on one device: loss conventions, what changes, metrics, donation.
(Multi-device equivalence and gradient accumulation: tests/test_sharding.py.)"""

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
from lora_jax.training.loss import masked_ce, masked_ce_sum, targets_and_mask

CFG = ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8)
LORA = lora_jax.LoraConfig(r=4, alpha=8.0, target_modules="all-linear")


def np_ce(logits, targets, mask):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * mask).sum() / mask.sum()


def test_loss_conventions_agree_and_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 6))
    labels = ids.copy()
    labels[:, :2] = -100  # prompt
    # HF style: logit t predicts labels[t + 1]
    ref = np_ce(logits[:, :-1], ids[:, 1:], (labels[:, 1:] != -100).astype(np.float32))
    got_hf = masked_ce(jnp.asarray(logits), {"input_ids": ids, "labels": labels})
    # train.data style: targets already shifted, loss_mask aligned with the logits
    targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), int)], 1)
    mask = np.concatenate([(labels[:, 1:] != -100), np.zeros((2, 1), bool)], 1)
    got_tm = masked_ce(jnp.asarray(logits), {"input_ids": ids, "targets": targets, "loss_mask": mask})
    np.testing.assert_allclose([got_hf, got_tm], [ref, ref], rtol=1e-6)
    s, n = masked_ce_sum(jnp.asarray(logits), {"input_ids": ids, "labels": labels})
    assert float(n) == mask.sum()
    t, m = targets_and_mask({"input_ids": jnp.asarray(ids)})
    assert float(m.sum()) == 2 * 5 and np.array_equal(t[:, :-1], ids[:, 1:])
    empty = masked_ce(jnp.asarray(logits), {"input_ids": ids, "labels": np.full_like(ids, -100)})
    assert float(empty) == 0.0  # no counted tokens: 0, not NaN


def batch(seed, accum=2, micro=2, T=8):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (accum, micro, T)).astype(np.int32)
    labels = ids.copy()
    labels[..., :3] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.fixture(scope="module")
def setup():
    model = build_model(CFG, scan_layers=True, lora=LORA)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = lora_jax.inject(params, LORA, jax.random.key(1))
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    specs = shd.param_specs(params, shd.default_rules("llama"), mesh)
    lora, frozen = lora_jax.split(params)
    return model, mesh, specs, lora, frozen


@pytest.fixture(scope="module")
def trained(setup):
    model, mesh, specs, lora, frozen = setup
    schedule = optax.linear_schedule(1e-2, 5e-3, 10)
    tx = training.default_optimizer(schedule, max_grad_norm=1.0)
    state = training.init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = training.make_train_step(model, tx, mesh, specs, schedule=schedule)
    frozen_before = jax.tree.map(np.asarray, frozen)
    lora_before = jax.tree.map(np.asarray, lora)
    first_state = state
    history = []
    for i in range(4):
        state, metrics = step(state, frozen, shd.shard_batch(batch(i), mesh, batch_axis=1))
        history.append(jax.tree.map(float, metrics))
    return dict(state=state, first_state=first_state, history=history, schedule=schedule,
                frozen_before=frozen_before, lora_before=lora_before)


def test_only_lora_changes_and_frozen_is_bitwise_identical(setup, trained):
    _, _, _, lora, frozen = setup
    state = trained["state"]
    assert sorted(state) == ["lora", "opt_state", "rng", "step"] and int(state["step"]) == 4
    assert jax.tree.structure(state["lora"]) == jax.tree.structure(lora)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), state["lora"]["model"], trained["lora_before"]["model"])
    for path, leaf in jax.tree_util.tree_flatten_with_path(moved)[0]:
        if path[-1].key == "lora_scale":
            assert leaf == 0  # the scales are constants
        else:
            assert leaf > 0  # every adapter trained (B from step 1, A from step 2)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(trained["frozen_before"])):
        assert np.array_equal(np.asarray(a), b)


def test_metrics(trained):
    h = trained["history"]
    assert set(h[0]) == {"loss", "grad_norm", "lr", "n_tokens"}
    assert [m["lr"] for m in h] == pytest.approx([float(trained["schedule"](i)) for i in range(4)])
    assert all(m["n_tokens"] == 2 * 2 * (8 - 3) for m in h)  # labels -100 on 3 of 8, last shifted out
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in h)


def test_state_is_donated(trained):
    assert all(x.is_deleted() for x in jax.tree.leaves(trained["first_state"]["lora"]))


def test_eval_step_matches_train_loss_and_loss_decreases(setup):
    model, mesh, specs, lora, frozen = setup
    tx = optax.adam(3e-2)
    state = training.init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = training.make_train_step(model, tx, mesh, specs)
    evaluate = training.make_eval_step(model, mesh, specs)
    b = batch(0, accum=1, micro=4)
    flat = {k: v[0] for k, v in b.items()}
    ev0 = evaluate(state["lora"], frozen, shd.shard_batch(flat, mesh))
    losses = []
    for _ in range(8):
        state, m = step(state, frozen, shd.shard_batch(b, mesh, batch_axis=1))
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(float(ev0["loss"]), rel=1e-5)
    assert float(ev0["n_tokens"]) == 4 * 5 and float(ev0["loss_sum"]) == pytest.approx(float(ev0["loss"]) * 20, rel=1e-5)
    assert losses[-1] < losses[0] - 0.1  # memorises the batch


def test_full_finetuning_mode_trains_everything(setup):
    model, mesh, specs, lora, frozen = setup
    params = lora_jax.combine(lora, frozen)
    tx = optax.sgd(1e-1)
    state = training.init_train_state(params, tx, jax.random.key(0), mesh=mesh, lora_specs=specs)
    before = jax.tree.map(np.asarray, state["lora"])
    step = training.make_train_step(model, tx, mesh, specs, trainable="all")
    state, m = step(state, {}, shd.shard_batch(batch(0), mesh, batch_axis=1))
    changed = jax.tree.map(lambda a, b: bool(np.abs(np.asarray(a) - b).max() > 0), state["lora"], before)
    assert changed["model"]["embed_tokens"]["embedding"] and changed["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    with pytest.raises(ValueError, match="trainable"):
        training.make_train_step(model, tx, mesh, specs, trainable="some")


def test_chunked_loss_step_equals_full_logits_step(setup):
    """The default step (LM head fused into the loss; chunk 6 = 3 positions of each of 2 rows, T = 8:
    a padded last chunk) == plain logits."""
    model, mesh, specs, lora, frozen = setup
    tx = optax.adam(1e-2)
    out = []
    for chunk in (None, 6):
        state = training.init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
        state, m = training.make_train_step(model, tx, mesh, specs, loss_chunk=chunk)(
            state, frozen, shd.shard_batch(batch(0), mesh, batch_axis=1))
        out.append((jax.tree.map(np.asarray, state["lora"]), jax.tree.map(float, m)))
    (lora_ref, m_ref), (lora_got, m_got) = out
    assert m_got["loss"] == pytest.approx(m_ref["loss"], rel=1e-5)
    assert m_got["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(lora_got), jax.tree.leaves(lora_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_precision_policy():
    """bf16 compute and bf16 frozen weights; fp32 LoRA master weights and AdamW state; the attention
    softmax and the loss's log-sum-exp in fp32 (read off the compiled step)."""
    model = build_model(CFG, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, lora=LORA)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = lora_jax.inject(params, LORA, jax.random.key(1))  # LoraConfig dtype float32: fp32 adapters
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    specs = shd.param_specs(params, shd.default_rules("llama"), mesh)
    lora, frozen = lora_jax.split(params)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype("float32")}
    tx = training.default_optimizer(1e-2)
    state = training.init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    b = shd.shard_batch(batch(0), mesh, batch_axis=1)
    lowered = training.make_train_step(model, tx, mesh, specs).lower(state, frozen, b)
    state, metrics = lowered.compile()(state, frozen, dict(b))
    assert {x.dtype for x in jax.tree.leaves(state["lora"])} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {jnp.dtype("float32")}
    assert metrics["loss"].dtype == jnp.float32 and 0 < float(metrics["loss"]) < 10
    hlo = lowered.as_text().splitlines()
    exps = [line.rsplit("tensor<", 1)[1].rstrip(">").split("x") for line in hlo if "stablehlo.exponential" in line]
    types = {(len(t) - 1, t[-1]) for t in exps}  # (rank, element type)
    # attention softmax [B, K, G, T, S] and the loss [tokens, V] in fp32; the [B, T, F] activation
    # (SiLU) runs in the compute dtype, as transformers' does
    assert types == {(5, "f32"), (2, "f32"), (3, "bf16")}, types
    assert any("stablehlo.dot_general" in line and "bf16" in line for line in hlo)  # bf16 compute
