"""DoRA (`use_dora`): weight-decomposed LoRA, computed exactly as PEFT's `DoraLinearLayer`.

DoRA adds one trained leaf next to A and B, the magnitude m (PEFT's `lora_magnitude_vector`):

    {'kernel': W[*stack, in, out], 'lora_a': A, 'lora_b': B, 'lora_scale': s,
     'lora_magnitude': m[*stack, out]}            # init: ||W||, the norm of each output column of W

The adapted layer computes (W' = W + s·A@B; column norms over the input axis, per output unit)

    y = x W + b + (f - 1) · (x W) + f · s · (x A B),     f = m / stop_gradient(||W + s·A@B||)

i.e. y = f · x (W + s·A@B) + b: the norm is detached as PEFT detaches it. With dropout active the
two DoRA terms take the dropped-out input (PEFT recomputes x_d W without bias then) while the base
term keeps the clean x. Merging folds it into one kernel W_merged = f · (W + s·A@B) with f from the
undropped norm; a merge cannot be undone without the base weights, so `unmerge` refuses it.

>>> W = jnp.array([[3.0, 0.0], [4.0, 1.0]])                  # [in, out]: column norms 5 and 1
>>> init_magnitude(W, jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0)
Array([5., 1.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _delta(a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
    scale = jnp.asarray(scale, jnp.float32)
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) * scale[..., None, None]


def weight_norm(kernel2d: jax.Array, a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
    """||W + s·A@B|| per output unit (over the input axis), fp32 [*stack, out]; kernel [*stack, in, out].

    >>> weight_norm(jnp.eye(2), jnp.ones((2, 1)), jnp.ones((1, 2)), 1.0)
    Array([2.236068, 2.236068], dtype=float32)
    """
    return jnp.linalg.norm(kernel2d.astype(jnp.float32) + _delta(a, b, scale), axis=-2)


def init_magnitude(kernel2d: jax.Array, a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
    """PEFT's initial magnitude: the weight norm of W + s·A@B (= ||W|| while B is zero)."""
    return weight_norm(kernel2d, a, b, scale)


def dora_term(base: jax.Array, lora_out: jax.Array, kernel2d: jax.Array, a: jax.Array, b: jax.Array, scale: Any,
              magnitude: jax.Array) -> jax.Array:
    """What DoRA adds to the base output: (f - 1)·base + f·lora_out, f = m / detached ||W + s·A@B||.

    `base` is x @ W without bias and `lora_out` is s·x A B, both [..., out] for the adapter input x
    (dropout applied, if any); kernel2d is W as [in, out] (one layer). Returns lora_out's dtype.

    >>> W = jnp.eye(2); a = jnp.ones((2, 1)) * 0.1; b = jnp.ones((1, 2)); x = jnp.ones((1, 2))
    >>> m = init_magnitude(W, a, b, 1.0)       # m = the current norm: f = 1, DoRA equals LoRA
    >>> bool(jnp.allclose(dora_term(x @ W, x @ a @ b, W, a, b, 1.0, m), x @ a @ b))
    True
    """
    norm = jax.lax.stop_gradient(weight_norm(kernel2d, a, b, scale))
    f = (magnitude.astype(jnp.float32) / norm).astype(lora_out.dtype)
    return (f - 1) * base.astype(lora_out.dtype) + f * lora_out


def merged_kernel(kernel2d: jax.Array, a: jax.Array, b: jax.Array, scale: Any, magnitude: jax.Array) -> jax.Array:
    """f · (W + s·A@B) in fp32, f = m / ||W + s·A@B|| per output unit (PEFT's DoRA merge).

    >>> W = jnp.array([[3.0], [4.0]])
    >>> merged_kernel(W, jnp.zeros((2, 1)), jnp.zeros((1, 1)), 1.0, jnp.array([10.0]))
    Array([[6.],
           [8.]], dtype=float32)
    """
    w = kernel2d.astype(jnp.float32) + _delta(a, b, scale)
    f = magnitude.astype(jnp.float32) / jnp.linalg.norm(w, axis=-2)
    return w * f[..., None, :]
