"""The unmerged LoRA path, `x @ W + dropout(x) @ A @ B · scale`, and the LoRA-aware `Dense`.

`lora_delta` computes the low-rank term without ever forming ΔW = A @ B (in·out values). Its
backward is written by hand (`jax.custom_vjp`): the small weight gradients dA = xᵀ(g Bᵀ)·s and
dB = (x A)ᵀ g·s contract over the flattened token axis of activations kept in their natural
[tokens, features] layout, which spares XLA the transposes of the large output gradient it
otherwise inserts before the two tiny matmuls (measured in benchmarks/bench_forward.py).

`Dense` is a drop-in for `flax.linen.Dense` whose params may hold LoRA leaves:

    {'kernel': W[in, out], 'bias'?: b[out]}                       # plain: y = x W + b
    {'kernel': W, 'bias'?: b, 'lora_a': A[in, r], 'lora_b': B[r, out], 'lora_scale': s}
                                                                  # y += dropout(x) A B · s
    {'kernel': QuantizedKernel(...), ...}                         # QLoRA: W dequantized on the fly
    {..., 'lora_magnitude': m[out]}                               # DoRA (lora_jax.variants.dora)

It never creates the LoRA leaves itself — `lora_jax.inject` adds them to the param tree — so one
module definition serves the base model, the adapted model and the merged model. The scale is the
adapter's own `lora_scale` leaf (PEFT's alpha/r for that module and layer), so a swapped-in adapter
brings its own; the `LoraConfig` the model was built with (`lora=`) supplies the dropout. Dropout on
the adapter input is active only when the caller passes a `'dropout'` rng.
"""

from __future__ import annotations

import contextvars
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.quant.kernel import dequantize, is_quantized
from lora_jax.quant.matmul import quantized_dot
from lora_jax.transform import adapter_scale
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE


# The LoraConfig of the enclosing `lora_jax.apply(model.apply, config)` call, for a `Dense` built without `lora=`.
APPLY_CONFIG: contextvars.ContextVar[LoraConfig | None] = contextvars.ContextVar("lora_jax_apply_config", default=None)


@jax.custom_vjp
def _low_rank(x2d: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    return ((x2d @ a) @ b) * scale


def _low_rank_fwd(x2d, a, b, scale):
    h = x2d @ a  # [T, r]: the only activation the backward keeps beyond x
    return (h @ b) * scale, (x2d, h, a, b, scale)


def _low_rank_bwd(res, g):
    x2d, h, a, b, scale = res
    g = g * scale.astype(g.dtype)
    # Contract over tokens T with both operands in [T, feature] layout.
    db = jnp.einsum("tr,to->ro", h, g, preferred_element_type=jnp.float32)
    dh = g @ b.T.astype(g.dtype)  # [T, r]
    da = jnp.einsum("ti,tr->ir", x2d, dh, preferred_element_type=jnp.float32)
    dx = dh @ a.T.astype(dh.dtype)
    return dx.astype(x2d.dtype), da.astype(a.dtype), db.astype(b.dtype), jnp.zeros_like(scale)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, n_in: int = 1) -> jax.Array:
    """The LoRA term `x @ A @ B · scale` for x [..., *in], A [prod(in), r], B [r, prod(out)].

    Returns [..., prod(out)] in x's dtype (A and B are cast to it: fp32 master adapters over a
    bf16 compute dtype). Differentiable in x, A and B.

    >>> x = jnp.ones((2, 3)); a = jnp.ones((3, 2)); b = jnp.ones((2, 4))
    >>> lora_delta(x, a, b, 0.5).shape
    (2, 4)
    """
    lead = x.shape[: x.ndim - n_in]
    x2d = x.reshape((-1, a.shape[0]))
    out = _low_rank(x2d, a.astype(x.dtype), b.astype(x.dtype), jnp.asarray(scale, x.dtype))
    return out.reshape(lead + (b.shape[-1],))


def adapter_delta(module: nn.Module, x: jax.Array, lora: LoraConfig | None, n_in: int = 1,
                  base: jax.Array | None = None) -> jax.Array | None:
    """The LoRA term for `module` if its params hold `lora_a`/`lora_b`, else None.

    Scales by the adapter's `lora_scale` (or `lora`'s scale for an adapter without one) and applies
    the config's dropout to the adapter input when the caller supplied a 'dropout' rng. Used by
    `Dense` and by `lora_jax.apply`'s interceptor, so both scale identically. With a DoRA magnitude
    leaf the term is DoRA's (`lora_jax.variants.dora`); `base` = x @ W without bias saves recomputing it.
    """
    if not (module.has_variable("params", LORA_A) and module.has_variable("params", LORA_B)):
        return None
    node = {name: module.get_variable("params", name) for name in (LORA_A, LORA_B, LORA_SCALE, LORA_MAGNITUDE)
            if module.has_variable("params", name)}
    key = ".".join(module.path)
    lora = lora if lora is not None else APPLY_CONFIG.get()
    scale = adapter_scale(node, lora, key)
    if lora is None and module.has_rng("dropout"):  # training: the dropout rate must be known
        raise ValueError(f"params at {key!r} hold LoRA leaves but the model has no LoraConfig for their dropout; "
                         "build it with lora=config (our models) or call through lora_jax.apply(model.apply, config)")
    if lora is not None and lora.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
        base = None  # DoRA's base term takes the dropped-out input (PEFT recomputes it)
    delta = lora_delta(x, node[LORA_A], node[LORA_B], scale, n_in=n_in)
    if LORA_MAGNITUDE not in node:
        return delta
    from lora_jax.variants.dora import dora_term  # noqa: PLC0415  (variants build on this module)

    kernel = module.get_variable("params", KERNEL)
    kernel = dequantize(kernel, jnp.float32) if is_quantized(kernel) else kernel
    kernel2d = kernel.reshape(node[LORA_A].shape[0], node[LORA_B].shape[-1])
    if base is None:
        lead = x.shape[: x.ndim - n_in]
        base = jnp.dot(x.reshape((-1, kernel2d.shape[0])), kernel2d.astype(x.dtype)).reshape(lead + (kernel2d.shape[1],))
    return dora_term(base, delta, kernel2d, node[LORA_A], node[LORA_B], scale, node[LORA_MAGNITUDE])


class Dense(nn.Module):
    """`nn.Dense` with a native unmerged LoRA path (see the module docstring).

    >>> import jax, lora_jax
    >>> layer = Dense(4, name="q_proj", lora=lora_jax.LoraConfig(r=2, target_modules=["q_proj"]))
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> sorted(params)
    ['bias', 'kernel']
    """

    features: int
    use_bias: bool = True
    dtype: Any = None  # compute dtype; None = the input's
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        stored = self.get_variable("params", KERNEL) if self.has_variable("params", KERNEL) else None
        if is_quantized(stored):  # a 4/8-bit frozen base (lora_jax.quant): dequantized on the fly
            y = quantized_dot(x, stored, dtype)
        else:
            kernel = self.param(KERNEL, self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
            y = jnp.dot(x, kernel.astype(dtype))
        delta = adapter_delta(self, x, self.lora, base=y)
        if delta is not None:
            y = y + delta
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
        return y
