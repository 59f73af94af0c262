"""Shared helpers for the attention tests: mask layouts, random q/k/v, and the comparison of an
implementation with the reference (outputs on real query rows, gradients w.r.t. q, k, v)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.masks import AttentionMask


def layouts(t: int) -> dict[str, np.ndarray | None]:
    """attention_mask values [3, t] per mask kind (None = plain causal)."""
    a, b = t // 3, t // 2
    left = np.ones((3, t), np.int32)
    left[1, :a] = 0
    left[2, : t - 2] = 0  # two real tokens
    right = np.ones((3, t), np.int32)
    right[1, b:] = 0
    right[2, 1:] = 0  # one real token
    packed = np.zeros((3, t), np.int32)
    packed[0, :a], packed[0, a:b], packed[0, b : t - 2] = 1, 2, 3  # three examples, then padding
    packed[1, :] = 1  # one example fills the row
    packed[2, 1 : a + 1], packed[2, a + 1 :] = 1, 2  # padding first, then two examples to the end
    return {"causal": None, "left_padding": left, "right_padding": right, "packed": packed}


def qkv(t: int, heads: int = 4, kv_heads: int = 2, d: int = 16, dtype=jnp.float32, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (3, t, heads, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (3, t, kv_heads, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (3, t, kv_heads, d), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[3], (3, t, heads, d), jnp.float32)
    return q, k, v, w


def make_mask(seg, window=None, sliding=None, implementation="auto") -> AttentionMask:
    return AttentionMask(segment_ids=None if seg is None else jnp.asarray(seg), window=window,
                         sliding=None if sliding is None else jnp.asarray(sliding), implementation=implementation)


@functools.partial(jax.jit, static_argnames=("fn", "scale", "softcap"))
def _run(q, k, v, w, mask, *, fn, scale, softcap):
    real = jnp.ones(q.shape[:2], bool) if mask.segment_ids is None else mask.segment_ids != 0
    real = real[:, :, None, None]

    def loss(q, k, v):
        out = fn(q, k, v, mask, scale, softcap).astype(jnp.float32)
        return jnp.sum(jnp.where(real, out * w, 0.0)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return jnp.where(real, out, 0.0), grads


def outputs_and_grads(fn, q, k, v, w, mask, scale, softcap=None):
    """(out [B, T, H, d] float32 with padding-query rows zeroed, (dq, dk, dv)) of sum(out · w) over real rows.

    Jitted once per (fn, shapes, static mask fields): the mask's arrays are arguments, so every
    layout of one kind shares a compilation."""
    out, grads = _run(q, k, v, w, mask, fn=fn, scale=scale, softcap=softcap)
    return np.asarray(out), [np.asarray(g, np.float32) for g in grads]


def assert_close(got, want, tol):
    """Outputs and every gradient within tol · max(1, |reference|) (bf16 tolerances scale with size)."""
    (out, grads), (ref_out, ref_grads) = got, want
    for name, a, b in [("out", out, ref_out)] + [(n, x, y) for n, x, y in zip(("dq", "dk", "dv"), grads, ref_grads)]:
        assert np.all(np.isfinite(a)), f"{name} has non-finite values"
        err = np.abs(a - b).max()
        assert err <= tol * max(1.0, np.abs(b).max()), f"{name}: max |diff| {err} vs reference scale {np.abs(b).max()}"
    assert np.abs(ref_out).max() > 0.1  # not trivially zero
