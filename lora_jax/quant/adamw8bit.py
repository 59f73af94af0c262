"""`adamw_8bit`: optax AdamW whose two moments live in blockwise dynamic 8-bit quantization.

This is bitsandbytes' 8-bit Adam (`bnb.optim.AdamW8bit`, blockwise since 0.37) as an optax
`GradientTransformation`. Per parameter leaf, in every step:

1. dequantize m (signed dynamic code book) and v (unsigned) in float32: code[q] * absmax of the
   block — blocks of `block_size` consecutive elements of the flattened leaf;
2. m = b1·m + (1-b1)·g,  v = b2·v + (1-b2)·g²,  update = m̂ / (√v̂ + eps) with optax's bias
   correction (then decoupled weight decay and the learning rate, as `optax.adamw`);
3. quantize m and v again with fresh per-block absmax (nearest code, ties to the lower one).

Leaves with fewer than `min_8bit_size` elements keep float32 moments (bitsandbytes does the same,
default 4096). State per leaf: `mu`/`nu` uint8 codes shaped like the parameter (so a sharded
train state gives them the parameter's spec, `lora_jax.training.state_specs`) and
`mu_scale`/`nu_scale` float32 [n_blocks]: 2 + 8/block_size bytes per element against fp32
AdamW's 8 (0.251× at block 2048, 0.254× at 256).

The default block, 2048, is the measured choice (`benchmarks/bench_adamw8bit.py`, results in
benchmarks/results/adamw8bit.md; least squares, 400 full-batch steps at lr 3e-2, 5 seeds): with a
W of 512x256 the mean relative gap to fp32 AdamW's loss curve was 23.7% at 2048 vs 27.1% at 256
(2048 closer in 5 of 5 seeds; final loss +28% vs +31% over fp32's); with the unit test's 64x32 W
both end within 0.6% of fp32 (2048 closer in 3 of 5 seeds). So 2048 lagged fp32 a little less and
takes 1.3% fewer bytes. bitsandbytes' AdamW8bit uses 256: `block_size=256` reproduces it (on the
512x256 regression bitsandbytes and ours end at 0.008678 vs 0.008679 — the lag is 8-bit Adam's own).
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.errors import UserError
from lora_jax.quant.codebooks import bounds, dynamic_map

BLOCK = 2048  # measured: see the module docstring
MIN_8BIT_SIZE = 4096


class ScaleByAdam8bitState(NamedTuple):
    count: jax.Array
    mu: Any  # uint8 codes shaped like each parameter (float32 moments for small leaves)
    nu: Any
    mu_scale: Any  # float32 [n_blocks] per leaf (an unused scalar for small leaves: checkpointers refuse size 0)
    nu_scale: Any


def _is_small(x: Any, min_size: int) -> bool:
    return int(np.prod(x.shape)) < min_size


def quantize_blockwise(x: jax.Array, signed: bool, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """(uint8 codes shaped like x, float32 absmax [n_blocks]) in the dynamic code book.

    >>> q, absmax = quantize_blockwise(jnp.array([0.5, 1.0, 0.0]), signed=True)
    >>> [round(v, 3) for v in dequantize_blockwise(q, absmax, signed=True).tolist()]
    [0.501, 1.0, 0.0]
    """
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = jnp.pad(flat, (0, -n % block)).reshape(-1, block)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38))[:, None], -1.0, 1.0)
    q = jnp.searchsorted(jnp.asarray(bounds(dynamic_map(signed))), scaled, side="left", method="scan_unrolled")
    return q.astype(jnp.uint8).reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise(q: jax.Array, absmax: jax.Array, signed: bool, block: int = BLOCK) -> jax.Array:
    """float32 values of `quantize_blockwise`'s codes (shaped like q).

    >>> dequantize_blockwise(jnp.zeros(3, jnp.uint8), jnp.ones(1), signed=False).tolist()
    [0.0, 0.0, 0.0]
    """
    values = jnp.asarray(dynamic_map(signed))[q.reshape(-1).astype(jnp.int32)]
    n = values.shape[0]
    values = jnp.pad(values, (0, -n % block)).reshape(-1, block) * absmax[:, None]
    return values.reshape(-1)[:n].reshape(q.shape)


def _static_int(name: str, value: Any, least: int) -> int:
    """`value` as a Python int >= least, or a one-line error (a traced value: optax.inject_hyperparams).

    >>> _static_int("block_size", 0, 1)
    Traceback (most recent call last):
    ...
    lora_jax.errors.UserError: adamw_8bit: block_size must be an int >= 1, got 0
    """
    try:
        value = operator.index(value)
    except TypeError:
        raise UserError(f"adamw_8bit: {name} must be a Python int fixed before tracing, got {value!r}; with "
                        "optax.inject_hyperparams pass static_args=('block_size', 'min_8bit_size')") from None
    if value < least:
        raise UserError(f"adamw_8bit: {name} must be an int >= {least}, got {value}")
    return value


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, block_size: int = BLOCK,
                       min_8bit_size: int = MIN_8BIT_SIZE) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with both moments in blockwise dynamic 8-bit (module docstring).

    >>> tx = scale_by_adam_8bit(min_8bit_size=1, block_size=256)
    >>> st = tx.init({"w": jnp.zeros(300)})
    >>> st.mu["w"].dtype, st.mu_scale["w"].shape
    (dtype('uint8'), (2,))
    """
    block_size, min_8bit_size = _static_int("block_size", block_size, 1), _static_int("min_8bit_size", min_8bit_size, 0)

    def init_fn(params):
        def zeros(p):
            if _is_small(p, min_8bit_size):
                return jnp.zeros(p.shape, jnp.float32), jnp.zeros((), jnp.float32)
            return jnp.zeros(p.shape, jnp.uint8), jnp.zeros((-(-int(np.prod(p.shape)) // block_size),), jnp.float32)

        pairs = jax.tree.map(zeros, params)
        codes = jax.tree.map(lambda _, pair: pair[0], params, pairs)
        scales = jax.tree.map(lambda _, pair: pair[1], params, pairs)
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), codes, codes, scales, scales)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        c1 = 1.0 - b1 ** count.astype(jnp.float32)
        c2 = 1.0 - b2 ** count.astype(jnp.float32)

        def one(g, mq, vq, ms, vs):
            g = g.astype(jnp.float32)
            small = mq.dtype != jnp.uint8  # float32 moments kept as they are
            m = mq if small else dequantize_blockwise(mq, ms, True, block_size)
            v = vq if small else dequantize_blockwise(vq, vs, False, block_size)
            m = b1 * m + (1.0 - b1) * g
            v = b2 * v + (1.0 - b2) * g * g
            u = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if small:
                return u, m, v, ms, vs
            (mq, ms), (vq, vs) = quantize_blockwise(m, True, block_size), quantize_blockwise(v, False, block_size)
            return u, mq, vq, ms, vs

        out = jax.tree.map(one, updates, state.mu, state.nu, state.mu_scale, state.nu_scale)
        pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out)  # noqa: E731
        u = jax.tree.map(lambda g, x: x.astype(g.dtype), updates, pick(0))
        return u, ScaleByAdam8bitState(count, pick(1), pick(2), pick(3), pick(4))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(learning_rate: Any, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-4,
               block_size: int = BLOCK, min_8bit_size: int = MIN_8BIT_SIZE) -> optax.GradientTransformation:
    """AdamW (`optax.adamw`'s chain) with 8-bit moments: scale_by_adam_8bit -> decay -> -lr.

    Defaults are optax.adamw's (weight_decay 1e-4); bitsandbytes' AdamW8bit defaults to 1e-2 and
    blocks of 256: pass `weight_decay=1e-2, block_size=256` to reproduce a bitsandbytes run.

    >>> import lora_jax
    >>> tx = lora_jax.quant.adamw_8bit(1e-2, min_8bit_size=1)
    >>> p = {"w": jnp.ones(512)}
    >>> u, _ = tx.update({"w": jnp.ones(512)}, tx.init(p), p)
    >>> round(float(u["w"][0]), 4)
    -0.01
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, block_size, min_8bit_size),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def state_bytes(state: Any) -> int:
    """Bytes held by an optimizer state (any optax state tree).

    >>> state_bytes(optax.adam(1e-3).init({"w": jnp.zeros(4)}))
    36
    """
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
