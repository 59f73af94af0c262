"""Only LoRA leaves train: the optax.partition optimizer and the gradients-wrt-LoRA path agree."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.layers import Dense

CFG = LoraConfig(r=4, alpha=8, target_modules=["fc1", "fc2"])


class Net(nn.Module):
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(Dense(32, name="fc1", lora=self.lora)(x))
        return Dense(8, name="fc2", lora=self.lora)(h)


@pytest.fixture(scope="module")
def problem():
    model = Net(lora=CFG)
    x = jax.random.normal(jax.random.key(0), (16, 8))
    y = jax.random.normal(jax.random.key(1), (16, 8))
    params = lora_jax.inject(model.init(jax.random.key(2), x)["params"], CFG, jax.random.key(3))
    loss = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)  # noqa: E731
    return params, loss, x, y


def tree_bytes(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def test_one_step_changes_only_lora_leaves(problem):
    params, loss, x, y = problem
    opt = lora_jax.optimizer(optax.adamw(1e-2), params)
    state = opt.init(params)
    grads = jax.grad(loss)(params, x, y)
    assert float(loss(params, x, y)) > 0
    updates, _ = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for (path, old), nxt in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(new)):
        name = path[-1].key
        if name in ("lora_a", "lora_b"):
            assert not np.array_equal(old, nxt), f"{path} did not train"
        else:
            np.testing.assert_array_equal(old, nxt)  # frozen: bitwise identical


def test_optimizer_state_only_for_lora_leaves(problem):
    params, _, _, _ = problem
    lora, _ = lora_jax.split(params)
    partitioned = lora_jax.optimizer(optax.adam(1e-3), params).init(params)
    alone = optax.adam(1e-3).init(lora_jax.split_constants(lora)[0])  # A and B; never the scales
    assert tree_bytes(partitioned) == tree_bytes(alone)
    assert tree_bytes(alone) > 0


def test_grad_wrt_lora_path_equals_partition_path(problem):
    params, loss, x, y = problem
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt = lora_jax.optimizer(tx, params)
    p_state = opt.init(params)
    lora, frozen = lora_jax.split(params)
    l_tx = lora_jax.optimizer(tx, lora)  # weight decay must never reach the adapters' scales
    l_state = l_tx.init(lora)
    grad_lora = jax.jit(lora_jax.lora_value_and_grad(loss))
    for _ in range(3):
        updates, p_state = opt.update(jax.grad(loss)(params, x, y), p_state, params)
        params = optax.apply_updates(params, updates)
        value, g = grad_lora(lora, frozen, x, y)
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(lora)  # no frozen grads at all
        updates, l_state = l_tx.update(g, l_state, lora)
        lora = optax.apply_updates(lora, updates)
    got, _ = lora_jax.split(params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(lora)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # fp32 rounding, amplified by Adam's 1/sqrt(nu)
    assert float(lora["fc1"]["lora_scale"]) == CFG.scale_for("fc1")  # untouched by the decay
