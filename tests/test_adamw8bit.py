"""8-bit AdamW: tracks fp32 AdamW and bitsandbytes' AdamW8bit on a small regression, at ~1/4 of the state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.quant import adamw_8bit, state_bytes
from lora_jax.quant.adamw8bit import dequantize_blockwise, quantize_blockwise


def regression(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    w_true = rng.standard_normal((64, 32)).astype(np.float32)
    y = x @ w_true + 0.1 * rng.standard_normal((256, 32)).astype(np.float32)
    w0 = (0.01 * rng.standard_normal((64, 32))).astype(np.float32)
    return x, y, {"w": w0, "b": np.zeros(32, np.float32)}


def loss_fn(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def train(tx, steps=150):
    x, y, params = regression()
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return np.array(losses), params, state


def test_blockwise_round_trip_is_within_the_dynamic_code_step():
    x = jax.random.normal(jax.random.key(0), (1000,)) * jnp.repeat(jnp.logspace(-3, 1, 4), 250)
    for signed, vals in ((True, x), (False, x * x)):
        q, absmax = quantize_blockwise(vals, signed, 256)
        back = dequantize_blockwise(q, absmax, signed, 256)
        assert q.dtype == jnp.uint8 and absmax.shape == (4,)
        rel = jnp.abs(back - vals) / jnp.repeat(absmax, 256)[:1000]
        assert float(rel.max()) < 0.0125  # the dynamic type's widest step in [0.1, 1] of absmax


def test_tracks_fp32_adamw_on_a_regression_with_a_quarter_of_the_state():
    lr = 3e-2
    ref_losses, ref_params, ref_state = train(optax.adamw(lr, weight_decay=0.0), 400)
    losses, params, state = train(adamw_8bit(lr, weight_decay=0.0, min_8bit_size=1), 400)
    assert losses[-1] < 2e-3 * losses[0]  # it trains, to the noise floor
    assert abs(losses[-1] - ref_losses[-1]) < 0.02 * ref_losses[-1]  # measured: 0.2%
    assert np.max(np.abs(losses - ref_losses) / ref_losses) < 0.35  # on the way down it lags a little (measured 29%)
    np.testing.assert_allclose(params["w"], ref_params["w"], atol=0.02)
    assert state_bytes(state) <= 0.3 * state_bytes(ref_state)


def test_matches_bitsandbytes_adamw8bit():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    x, y, p0 = regression()
    lr, steps = 3e-2, 40
    losses, params, _ = train(adamw_8bit(lr, weight_decay=0.01, block_size=256, min_8bit_size=1), steps)  # bnb's block
    w = torch.nn.Parameter(torch.from_numpy(p0["w"].copy()))
    b = torch.nn.Parameter(torch.from_numpy(p0["b"].copy()))
    opt = bnb.optim.AdamW8bit([w, b], lr=lr, weight_decay=0.01, min_8bit_size=1)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    theirs = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((tx @ w + b - ty) ** 2).mean()
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    assert opt.state[w]["state1"].dtype == torch.uint8  # bitsandbytes really ran 8-bit here
    np.testing.assert_allclose(losses, theirs, rtol=2e-3)  # measured: 2e-4 at step 40
    # bitsandbytes' CPU kernel rounds to its code book through a 65536-entry table, so a few codes
    # land one level apart; on average the parameters agree to ~2e-3 (they move by ~1)
    assert float(np.abs(np.asarray(params["w"]) - w.detach().numpy()).mean()) < 5e-3


def test_small_leaves_keep_float32_moments_and_the_state_checkpoints(tmp_path):
    from lora_jax.training import Checkpointer

    tx = adamw_8bit(1e-3)
    params = {"big": jnp.zeros((64, 128)), "small": jnp.zeros(16)}
    state = tx.init(params)
    assert state[0].mu["big"].dtype == jnp.uint8 and state[0].mu_scale["big"].shape == (4,)  # 8192 / 2048
    assert state[0].mu["small"].dtype == jnp.float32 and state[0].mu_scale["small"].shape == ()
    state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)[1]
    with Checkpointer(tmp_path) as ckpt:  # orbax refuses size-0 arrays: small leaves' scales are not empty
        ckpt.save(1, {"opt": state})
        ckpt.wait()
        restored, _ = ckpt.restore(target={"opt": state})
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored["opt"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_or_traced_block_sizes_are_one_line_errors_and_inject_hyperparams_works_with_static_args():
    from lora_jax.errors import UserError

    with pytest.raises(UserError, match="block_size must be an int >= 1, got 0"):
        adamw_8bit(1e-3, block_size=0)
    p, g = {"w": jnp.ones(300, jnp.bfloat16)}, {"w": jnp.full(300, 0.1, jnp.bfloat16)}
    step = lambda tx: jax.jit(tx.update)(g, tx.init(p), p)  # noqa: E731
    with pytest.raises(UserError, match=r"static_args=\('block_size', 'min_8bit_size'\)"):
        step(optax.inject_hyperparams(adamw_8bit)(learning_rate=1e-2, min_8bit_size=1, block_size=256))
    # float32 hyperparameters: with bf16 params optax would round b2=0.999 to 1 (optax.adamw NaNs the same way)
    injected = optax.inject_hyperparams(adamw_8bit, static_args=("block_size", "min_8bit_size"), hyperparam_dtype=jnp.float32)
    u, _ = step(injected(learning_rate=1e-2, min_8bit_size=1, block_size=256))
    ref, _ = step(adamw_8bit(1e-2, min_8bit_size=1, block_size=256))
    np.testing.assert_allclose(np.asarray(u["w"], np.float32), np.asarray(ref["w"], np.float32), rtol=1e-2)
