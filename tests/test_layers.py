"""The LoRA-aware Dense: base equivalence, the hand-written backward, dropout, mixed precision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.layers import Dense, lora_delta

CFG = LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["proj"])


def test_without_adapters_it_is_flax_dense():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    p = nn.Dense(5).init(jax.random.key(1), x)
    np.testing.assert_array_equal(Dense(5).apply(p, x), nn.Dense(5).apply(p, x))


def test_custom_vjp_matches_autodiff_of_the_plain_formula():
    k = jax.random.split(jax.random.key(0), 4)
    x, a, b, g = (jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (8, 3)),
                  jax.random.normal(k[2], (3, 6)), jax.random.normal(k[3], (2, 5, 6)))
    ours = jax.vjp(lambda x, a, b: lora_delta(x, a, b, 0.7), x, a, b)
    ref = jax.vjp(lambda x, a, b: (x @ a @ b) * 0.7, x, a, b)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    for got, want in zip(ours[1](g), ref[1](g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _adapted(x):
    model = Dense(6, name="proj", lora=CFG)
    params = model.init(jax.random.key(0), x)["params"]
    params = lora_jax.inject({"proj": params}, CFG, jax.random.key(1))["proj"]
    params["lora_b"] = jax.random.normal(jax.random.key(2), params["lora_b"].shape)
    return model, params


def test_dropout_only_with_a_dropout_rng():
    x = jax.random.normal(jax.random.key(3), (4, 8))
    model, params = _adapted(x)
    eval1 = model.apply({"params": params}, x)
    np.testing.assert_array_equal(eval1, model.apply({"params": params}, x))
    train1 = model.apply({"params": params}, x, rngs={"dropout": jax.random.key(5)})
    train2 = model.apply({"params": params}, x, rngs={"dropout": jax.random.key(6)})
    assert not np.allclose(train1, eval1) and not np.allclose(train1, train2)
    # dropout touches only the adapter input: with B = 0 training equals eval
    zero_b = dict(params, lora_b=jnp.zeros_like(params["lora_b"]))
    np.testing.assert_allclose(model.apply({"params": zero_b}, x, rngs={"dropout": jax.random.key(5)}),
                               model.apply({"params": zero_b}, x), rtol=1e-6)


def test_bf16_compute_with_fp32_adapters_gives_fp32_grads():
    x = jax.random.normal(jax.random.key(3), (4, 8)).astype(jnp.bfloat16)
    model, params = _adapted(x)
    model = model.clone(dtype=jnp.bfloat16)
    lora, frozen = lora_jax.split({"proj": params})
    loss = lambda p: model.apply({"params": p["proj"]}, x).astype(jnp.float32).sum()  # noqa: E731
    _, g = lora_jax.lora_value_and_grad(loss)(lora, frozen)
    assert g["proj"]["lora_a"].dtype == jnp.float32 and float(jnp.abs(g["proj"]["lora_a"]).sum()) > 0


def test_the_adapter_scale_is_its_own_leaf_and_dropout_needs_a_config():
    x = jnp.ones((1, 8))
    model, params = _adapted(x)
    # inference needs no config: the adapter carries its scale (alpha / r = 2)
    assert float(params["lora_scale"]) == 2.0
    np.testing.assert_allclose(Dense(6, name="proj").apply({"params": params}, x), model.apply({"params": params}, x))
    # a swapped-in adapter with another scale is applied with its own, not the model config's
    doubled = dict(params, lora_scale=jnp.float32(4.0))
    base = model.apply({"params": {k: v for k, v in params.items() if not k.startswith("lora")}}, x)
    np.testing.assert_allclose(model.apply({"params": doubled}, x) - base, 2 * (model.apply({"params": params}, x) - base),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="no LoraConfig for their dropout"):
        Dense(6, name="proj").apply({"params": params}, x, rngs={"dropout": jax.random.key(0)})


def test_an_adapter_without_scale_whose_rank_disagrees_with_the_config_is_refused():
    x = jnp.ones((1, 8))
    model, params = _adapted(x)
    legacy = {k: v for k, v in params.items() if k != "lora_scale"}
    np.testing.assert_allclose(model.apply({"params": legacy}, x), model.apply({"params": params}, x))
    other = dict(legacy, lora_a=legacy["lora_a"][:, :2], lora_b=legacy["lora_b"][:2])
    with pytest.raises(ValueError, match="has rank 2 but the LoraConfig gives 4"):
        model.apply({"params": other}, x)
