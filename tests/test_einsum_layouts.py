"""Einsum kernels whose contracted axes are not the leading ones (linen and nnx): A spans exactly
the contracted axes (its fan-in), B the others; forward, merge and derived shardings agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lora_jax
import lora_jax.nnx as lnnx
from lora_jax import KernelLayout, LoraConfig
from lora_jax.sharding.rules import param_specs

H, D, K, R = 2, 16, 3, 4
EQ = "btd,hdk->bthk"  # contracts the kernel's middle axis


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((H, D, K), EQ, use_bias=False, name="proj")(x)
        return nn.Dense(5, name="head")(h.reshape(h.shape[:2] + (H * K,)))


def test_linen_einsum_any_equation():
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    model = Net()
    params = model.init(jax.random.key(1), x)["params"]
    layouts = lora_jax.kernel_layouts(model, x)
    assert layouts["proj"] == KernelLayout(stack=0, n_in=1, in_axes=(1,))
    cfg = LoraConfig(r=R, lora_alpha=8, target_modules=["proj"])
    lp = lora_jax.inject(params, cfg, jax.random.key(2), layouts=layouts)
    a = lp["proj"]["lora_a"]
    assert a.shape == (D, R) and lp["proj"]["lora_b"].shape == (R, H * K)
    assert float(jnp.abs(a).max()) <= 1 / D**0.5 and float(jnp.abs(a).max()) > 0.8 / D**0.5  # fan-in = D, PEFT's bound
    lp["proj"]["lora_b"] = jax.random.normal(jax.random.key(3), (R, H * K))
    y = lora_jax.apply(model.apply, cfg)({"params": lp}, x)
    assert float(jnp.abs(y - model.apply({"params": params}, x)).max()) > 1e-3
    merged = lora_jax.merge(lp, layouts=layouts)
    dw = merged["proj"]["kernel"] - params["proj"]["kernel"]
    expect = 2.0 * jnp.einsum("dr,rhk->hdk", a, lp["proj"]["lora_b"].reshape(R, H, K))  # ΔW over (d) x (h, k)
    np.testing.assert_allclose(dw, expect, atol=1e-5)
    np.testing.assert_allclose(model.apply({"params": merged}, x), y, atol=1e-5)
    with pytest.raises(ValueError, match="kernel 'proj' has shape .*pass layouts="):
        lora_jax.merge(lp)
    rules = [(r"proj\.kernel", P("tensor", "fsdp", None)), (r".*", P())]
    specs = param_specs(lp, rules, layouts=layouts)
    assert specs["proj"]["lora_a"] == P("fsdp", None) and specs["proj"]["lora_b"] == P(None, "tensor")


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Einsum(EQ, (H, D, K), rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def test_nnx_einsum_any_equation():
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    model = NnxNet(nnx.Rngs(0))
    base = np.asarray(model(x))
    lnnx.inject(model, LoraConfig(r=R, lora_alpha=8, target_modules=["proj"]), nnx.Rngs(1))
    assert model.proj.lora_a.shape == (D, R) and model.proj.lora_b.shape == (R, H * K)
    model.proj.lora_b[...] = jax.random.normal(jax.random.key(3), (R, H * K))
    y = np.asarray(model(x))
    assert np.abs(y - base).max() > 1e-3
    plain = lnnx.merge_and_unload(model)
    np.testing.assert_allclose(np.asarray(plain(x)), y, atol=1e-5)


class CallTimeEquation(nn.Module):  # linen's Einsum also takes its equation when called
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((H, D, K), use_bias=False, name="proj")(x, EQ)


def test_linen_einsum_equation_given_at_call_time():
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    layouts = lora_jax.kernel_layouts(CallTimeEquation(), x)
    assert layouts["proj"] == KernelLayout(stack=0, n_in=1, in_axes=(1,))
    cfg = LoraConfig(r=R, target_modules=["proj"])
    lp = lora_jax.inject(CallTimeEquation().init(jax.random.key(1), x)["params"], cfg, jax.random.key(2), layouts=layouts)
    lp["proj"]["lora_b"] = jax.random.normal(jax.random.key(3), (R, H * K))
    y = lora_jax.apply(CallTimeEquation().apply, cfg)({"params": lp}, x)
    merged = CallTimeEquation().apply({"params": lora_jax.merge(lp, layouts=layouts)}, x)
    np.testing.assert_allclose(y, merged, atol=1e-5)
    assert float(jnp.abs(merged - CallTimeEquation().apply({"params": lora_jax.split(lp)[1]}, x)).max()) > 1e-3


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_based_inits_keep_the_function_of_an_einsum_contracting_a_middle_axis(init):
    """PiSSA/OLoRA split W into W_res + s·A@B over the kernel's (contracted) x (other) axes: the
    adapted model starts as the base model."""
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    params = Net().init(jax.random.key(1), x)["params"]
    layouts = lora_jax.kernel_layouts(Net(), x)
    cfg = LoraConfig(r=R, target_modules=["proj"], init=init)
    lp = lora_jax.inject(params, cfg, jax.random.key(2), layouts=layouts)
    assert float(jnp.abs(lp["proj"]["kernel"] - params["proj"]["kernel"]).max()) > 1e-3  # the base was rewritten
    np.testing.assert_allclose(lora_jax.apply(Net().apply, cfg)({"params": lp}, x), Net().apply({"params": params}, x), atol=1e-5)
