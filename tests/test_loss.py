"""lora_jax.training.loss: the chunked (fused LM-head) loss equals the plain one, value and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.models import ModelConfig, build_model
from lora_jax.models.build import lm_head
from lora_jax.training.loss import chunked_ce_sum, masked_ce_sum

B, T, D, V = 2, 7, 6, 13


def data(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    ids = rng.integers(0, V, (B, T))
    labels = ids.copy()
    labels[:, :2] = -100  # prompt tokens
    labels[1, 5] = -100  # a hole in the middle
    return h, w, ids, labels


def batches(ids, labels):
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), int)], 1)
    loss_mask = np.concatenate([labels[:, 1:] != -100, np.zeros((B, 1), bool)], 1)
    return {"hf labels": {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)},
            "targets + loss_mask": {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
                                    "loss_mask": jnp.asarray(loss_mask)},
            "plain LM": {"input_ids": jnp.asarray(ids)}}


@pytest.mark.parametrize("chunk", [1, 4, 6, 14, 64])  # chunk // B positions per row: 1, 2, 3 (padded last
# chunk), 7 = T (one chunk), 32 (clipped to T)
@pytest.mark.parametrize("convention", ["hf labels", "targets + loss_mask", "plain LM"])
def test_chunked_equals_unchunked_value_and_grads(chunk, convention):
    h, w, ids, labels = data()
    batch = batches(ids, labels)[convention]

    def ref(h, w):
        return masked_ce_sum(jnp.einsum("btd,dv->btv", h, w), batch)

    def got(h, w):
        return chunked_ce_sum(h, w, batch, chunk=chunk)

    (rs, rn), (rgh, rgw) = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(h, w)
    (s, n), (gh, gw) = jax.jit(jax.value_and_grad(got, argnums=(0, 1), has_aux=True))(h, w)
    assert float(n) == float(rn) > 0
    np.testing.assert_allclose(s, rs, rtol=1e-5)
    np.testing.assert_allclose(gh, rgh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, rgw, rtol=1e-5, atol=1e-6)


def test_tied_layout_and_only_hidden_differentiated():
    h, w, ids, labels = data(1)
    batch = batches(ids, labels)["hf labels"]
    ref_g = jax.grad(lambda h: masked_ce_sum(h @ w, batch)[0])(h)
    # The [V, D] embedding layout (tied heads), w not differentiated: the frozen-head (LoRA) case.
    g = jax.jit(jax.grad(lambda h: chunked_ce_sum(h, w.T, batch, chunk=5, vocab_first=True)[0]))(h)
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-6)
    ref_gw = jax.grad(lambda e: masked_ce_sum(h @ e.T, batch)[0])(w.T)
    gw = jax.grad(lambda e: chunked_ce_sum(h, e, batch, chunk=5, vocab_first=True)[0])(w.T)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-6)
    # a cotangent other than 1 scales both gradients
    g2 = jax.grad(lambda h: 3.0 * chunked_ce_sum(h, w, batch, chunk=4)[0])(h)
    np.testing.assert_allclose(g2, 3.0 * ref_g, rtol=1e-5, atol=1e-6)


def test_no_counted_tokens_gives_zero_and_zero_grads():
    h, w, ids, _ = data(2)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.full(ids.shape, -100)}
    (s, n), g = jax.value_and_grad(lambda h: chunked_ce_sum(h, w, batch, chunk=4), has_aux=True)(h)
    assert float(s) == 0.0 and float(n) == 0.0 and float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_model_hidden_times_head_is_the_logits(tied):
    cfg = ModelConfig("llama", V, 8, 16, 2, 2, 1, 4, tie_word_embeddings=tied)
    model = build_model(cfg)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, V, (B, T)))
    params = model.init(jax.random.key(0), ids)["params"]
    logits, _ = model.apply({"params": params}, ids)
    hidden, _ = model.apply({"params": params}, ids, return_hidden=True)
    w, vocab_first = lm_head(model, params)
    assert vocab_first == tied
    np.testing.assert_allclose(jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", hidden, w), logits,
                               rtol=1e-5, atol=1e-5)


def test_lm_head_with_lora_leaves_is_left_to_the_model():
    cfg = ModelConfig("llama", V, 8, 16, 2, 2, 1, 4, tie_word_embeddings=False)
    lcfg = lora_jax.LoraConfig(r=2, target_modules=["lm_head"])
    model = build_model(cfg, lora=lcfg)
    params = lora_jax.inject(model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"], lcfg,
                             jax.random.key(1))
    assert lm_head(model, params) is None  # the step then uses the model's own (adapted) logits
