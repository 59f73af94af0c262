"""`quantized_dot`: `x @ W` for a `QuantizedKernel` W, dequantized inside the computation.

The forward dequantizes W (XLA fuses the unpacking and scaling into one elementwise pass) and
multiplies. The backward is written by hand (`jax.custom_vjp`) so that what is kept for it is the
*quantized* kernel, not its float copy: plain autodiff would keep the dequantized W of every layer
(stacked across a scan) as a residual for dx = g Wᵀ, i.e. the whole model in full precision. Here
the backward dequantizes W again (cheap, elementwise) and the kernel itself gets no gradient — it
is frozen. The compiled step's memory plan is checked in the tests: its temporaries stay far below
the size of the model in bf16.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.kernel import QuantizedKernel, dequantize_t


def _dot_t(x: jax.Array, w_t: jax.Array) -> jax.Array:
    """x [..., in] · w_t [out, in] -> [..., out] (w_t contracted on its second axis, no transpose)."""
    return jax.lax.dot_general(x, w_t, (((x.ndim - 1,), (1,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qdot(x, q, dtype):
    return _dot_t(x, dequantize_t(q, dtype))


def _qdot_fwd(x, q, dtype):
    return _dot_t(x, dequantize_t(q, dtype)), q


def _zero_cotangent(x: Any) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros(x.shape, x.dtype)
    return np.zeros(x.shape, jax.dtypes.float0)


def _qdot_bwd(dtype, q, g):
    # Dequantized again from the codes. The barrier ties it to g: it is neither merged with the
    # forward's dequantization (CSE) nor computed before it is needed, so one layer's float weights
    # exist at a time. (XLA:CPU drops barriers; there, unrolled layers may keep them all for the
    # step, scanned layers — the default — do not.)
    q, g = jax.lax.optimization_barrier((q, g))
    dx = g @ dequantize_t(q, dtype).astype(g.dtype)
    return dx, jax.tree.map(_zero_cotangent, q)


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def quantized_dot(x: jax.Array, q: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """`x @ dequantize(q)` in `dtype` (default: x's) for an unstacked kernel; differentiable in x only.

    >>> import numpy as np, lora_jax
    >>> w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> q = lora_jax.quantize({"p": {"kernel": w}}, "nf4")["p"]["kernel"]
    >>> x = jnp.ones((2, 64))
    >>> bool(jnp.allclose(quantized_dot(x, q), x @ lora_jax.dequantize(q), atol=1e-5))
    True
    """
    if q.codes.ndim != 2:
        raise ValueError(f"quantized_dot takes one layer's kernel; got a stacked one of shape {q.shape}")
    dtype = jnp.dtype(dtype or x.dtype)
    return _qdot(x.astype(dtype), q, dtype)
