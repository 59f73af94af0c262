"""inject / split / combine / merge / unmerge on a tree of LoRA-aware Dense layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.layers import Dense

CFG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"], rank_pattern={"up_proj": 2}, use_rslora=True)


class MLPBlock(nn.Module):
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        h = Dense(32, name="q_proj", lora=self.lora)(x)
        h = Dense(48, name="up_proj", lora=self.lora)(jax.nn.silu(h))
        return Dense(16, use_bias=False, name="down_proj", lora=self.lora)(h)


@pytest.fixture(scope="module")
def model_and_params():
    model = MLPBlock(lora=CFG)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    return model, x, model.init(jax.random.key(1), x)["params"]


def randomize(lora, seed=0):
    lora, scales = lora_jax.split_constants(lora)
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    lora = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape) * 0.2 for x, k in zip(leaves, keys)])
    return lora_jax.combine(lora, scales)


def test_inject_is_pure_and_starts_at_the_base_model(model_and_params):
    model, x, params = model_and_params
    before = jax.tree_util.tree_map(np.asarray, params)
    lp = lora_jax.inject(params, CFG, jax.random.key(2))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(before)  # input untouched
    assert "lora_a" not in params["q_proj"]
    f = jax.jit(model.apply)
    np.testing.assert_array_equal(f({"params": lp}, x), f({"params": params}, x))


def test_split_combine_round_trip(model_and_params):
    _, _, params = model_and_params
    lp = lora_jax.inject(params, CFG, jax.random.key(2))
    lora, frozen = lora_jax.split(lp)
    assert sorted(lora) == ["q_proj", "up_proj"] and sorted(lora["q_proj"]) == ["lora_a", "lora_b", "lora_scale"]
    assert not lora_jax.has_lora(frozen)
    assert jax.tree_util.tree_structure(lora_jax.combine(lora, frozen)) == jax.tree_util.tree_structure(lp)
    mask = lora_jax.trainable_mask(lp)
    assert mask["q_proj"] == {"kernel": False, "bias": False, "lora_a": True, "lora_b": True, "lora_scale": False}
    with pytest.raises(ValueError, match="in more than one tree"):
        lora_jax.combine(lp, frozen)


def test_merged_forward_equals_unmerged_with_nonzero_adapters(model_and_params):
    model, x, params = model_and_params
    lora, frozen = lora_jax.split(lora_jax.inject(params, CFG, jax.random.key(2)))
    lp = lora_jax.combine(randomize(lora), frozen)
    unmerged = model.apply({"params": lp}, x)
    base = model.apply({"params": params}, x)
    merged_params = jax.jit(lora_jax.merge, static_argnums=1)(lp, CFG)
    assert not lora_jax.has_lora(merged_params)
    merged = model.apply({"params": merged_params}, x)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2
    assert float(jnp.abs(merged - unmerged).max() / jnp.abs(unmerged).max()) <= 1e-5


def test_merge_unmerge_round_trip(model_and_params):
    _, _, params = model_and_params
    lora, frozen = lora_jax.split(lora_jax.inject(params, CFG, jax.random.key(2)))
    lp = lora_jax.combine(randomize(lora), frozen)
    back = lora_jax.unmerge(lora_jax.merge(lp, CFG), lora_jax.split(lp)[0], CFG)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lp)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lp)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_delta_weight_uses_the_peft_scale():
    a = jnp.arange(6.0).reshape(3, 2)
    b = jnp.arange(8.0).reshape(2, 4)
    p = {"q": {"kernel": jnp.zeros((3, 4)), "lora_a": a, "lora_b": b}}
    for cfg in (LoraConfig(r=2, alpha=6, target_modules=["q"]), LoraConfig(r=2, alpha=6, use_rslora=True, target_modules=["q"])):
        np.testing.assert_allclose(lora_jax.merge(p, cfg)["q"]["kernel"], (a @ b) * cfg.scale_for("q", 2), rtol=1e-6)


def test_merge_into_bf16_kernel_keeps_its_dtype():
    p = {"q": {"kernel": jnp.ones((4, 4), jnp.bfloat16), "lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}
    assert lora_jax.merge(p, LoraConfig(r=2, alpha=2, target_modules=["q"]))["q"]["kernel"].dtype == jnp.bfloat16
