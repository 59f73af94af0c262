"""`QuantizedKernel`: a frozen kernel stored in 4 (NF4) or 8 (int8) bits, at the kernel's own place.

A quantized kernel is a registered pytree node sitting exactly where the float kernel was, so
module keys, LoRA targeting, `inject`, `split`/`combine` and the param-spec rules see the same
tree (the tree walkers treat the node as one leaf with the kernel's logical `shape`):

    {'q_proj': {'kernel': W[in, out] (bf16)}}
    ->  lora_jax.quantize(params, "nf4", block_size=64, double_quant=True)
    {'q_proj': {'kernel': QuantizedKernel(scheme='nf4', shape=(in, out), dtype=bfloat16,
        codes          uint8   [out, in/2]     two 4-bit NF4 codes per byte, high nibble first
        absmax         uint8   [out, in/64]    the block scales, 8-bit codes of (absmax - offset)
        nested_absmax  float32 [ceil(out*in/64/256)]   second-level scale per 256 block scales
        nested_code    float32 [256]           the 8-bit dynamic code book of those codes
        offset         float32 []              mean of the first-level absmax)}}
    + inject:  'lora_a' A[in, r], 'lora_b' B[r, out] beside it, fp32 as always

Without double quantization `absmax` is the float32 scales and the three `nested`/`offset`
fields are None. A stacked kernel [L, in, out] (scanned layers) gains the leading [L] on every
field; each layer is quantized on its own, as a per-layer checkpoint tensor is.

The layout is bitsandbytes' (`quantize_4bit`): the blocks run over the rows of the PyTorch weight
[out, in] (our kernel transposed), 64 consecutive input features of one output feature per block,
so a `*-bnb-4bit` checkpoint's tensors are these fields reshaped, with no re-quantization
(`lora_jax.quant.bnb`). Dequantization (`dequantize`) is bitsandbytes' own arithmetic in float32
(`code[q] * absmax`, with `absmax = nested_code[q2] * nested_absmax + offset`), cast once to the
compute dtype. int8 stores signed codes [out, in] with the same block scales: w = q / 127 * absmax.

Inside a jitted step the kernel is dequantized on the fly (`lora_jax.quant.matmul`), one layer at
a time; the full-precision weights are never stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.codebooks import NF4

SCHEMES = ("nf4", "int8")
NESTED_BLOCK = 256  # bitsandbytes' block size for double quantization of the scales


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A blockwise-quantized kernel (module docstring); `shape`/`dtype` are the float kernel's.

    >>> q = QuantizedKernel("nf4", "float32", 4, np.zeros((3, 4), np.uint8), np.ones((3, 2), np.float32))
    >>> q.shape, q.dtype, q.double_quant
    ((8, 3), dtype('float32'), False)
    """

    scheme: str
    orig_dtype: str  # dtype of the kernel before quantization: what dequantize() returns by default
    block_size: int
    codes: Any
    absmax: Any
    nested_absmax: Any = None
    nested_code: Any = None
    offset: Any = None

    is_param_leaf = True  # the param-tree walkers (lora_jax.tree.iter_leaves) see one leaf here

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    @property
    def shape(self) -> tuple[int, ...]:
        *stack, out, packed = self.codes.shape
        return (*stack, packed * 2 if self.scheme == "nf4" else packed, out)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.orig_dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales and second-level scales together."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

    def replace(self, **fields: Any) -> "QuantizedKernel":
        return dataclasses.replace(self, **fields)


jax.tree_util.register_dataclass(
    QuantizedKernel,
    data_fields=["codes", "absmax", "nested_absmax", "nested_code", "offset"],
    meta_fields=["scheme", "orig_dtype", "block_size"],
)


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedKernel` (the `is_leaf` of the param-tree walkers).

    >>> is_quantized(np.zeros(2))
    False
    """
    return isinstance(x, QuantizedKernel)


def _scales(absmax, nested_absmax, nested_code, offset, transposed: bool = False) -> jax.Array:
    """float32 block scales [out, nb] of one (unstacked) kernel ([nb, out] from transposed=True)."""
    if transposed:
        absmax = absmax.T
    if offset is None:
        return absmax.astype(jnp.float32)
    rows, cols = absmax.shape
    i, j = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0), jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    flat = j * rows + i if transposed else i * cols + j  # position in bitsandbytes' flat [out * nb] order
    second = jnp.take(nested_absmax, flat // NESTED_BLOCK, axis=0)  # a gather from a tiny replicated table
    product = nested_code[absmax.astype(jnp.int32)] * second
    # bitsandbytes rounds the product, then the sum; XLA would contract the two into one FMA (one
    # rounding). An integer xor between them stops that: with a value that is 0 unless the offset
    # is NaN (and then the sum is NaN anyway), so it is an identity, and the scales stay
    # bit-identical to bitsandbytes' under jit too (tested).
    nan_bit = jnp.isnan(offset).astype(jnp.int32)
    product = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(product, jnp.int32) ^ nan_bit, jnp.float32)
    return product + offset


def _values(scheme: str, codes: jax.Array, transposed: bool) -> jax.Array:
    """The code values in [-1, 1], float32 [out, in] ([in, out] from transposed=True), before scaling."""
    if scheme == "int8":
        values = codes.astype(jnp.float32) / jnp.float32(127.0)
        return values.T if transposed else values
    if transposed:  # unpack along the first axis: [in/2, out] -> [in/2, 2, out] -> [in, out]
        c = codes.T
        idx = jnp.stack([c >> 4, c & 0xF], axis=1).reshape(2 * c.shape[0], c.shape[1])
    else:
        idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(codes.shape[0], 2 * codes.shape[1])
    return jnp.asarray(NF4)[idx.astype(jnp.int32)]


def _dequantize_one(q: QuantizedKernel, transposed: bool = False) -> jax.Array:
    """[out, in] float32, or the kernel orientation [in, out] with transposed=True.

    The two orientations compute the same values from differently laid out reads, so XLA cannot
    merge the forward's dequantization (kernel orientation) with the backward's (CSE would keep
    every layer's float weights alive between the two passes; XLA:CPU ignores optimization barriers).
    """
    scales = _scales(q.absmax, q.nested_absmax, q.nested_code, q.offset, transposed)
    values = _values(q.scheme, q.codes, transposed)
    bs = q.block_size
    if transposed:
        n_in, out = values.shape
        return (values.reshape(n_in // bs, bs, out) * scales[:, None, :]).reshape(n_in, out)
    out, n_in = values.shape
    return (values.reshape(out, n_in // bs, bs) * scales[..., None]).reshape(out, n_in)


def dequantize_t(q: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """The weight in PyTorch's orientation [*stack, out, in] (the kernel transposed), in `dtype`.

    >>> q = QuantizedKernel("int8", "float32", 2, np.array([[127, -127]], np.int8), np.full((1, 1), 0.5, np.float32))
    >>> dequantize_t(q).tolist()
    [[0.5, -0.5]]
    """
    return _dequantize(q, dtype, transposed=False)


def _dequantize(q: QuantizedKernel, dtype: Any, transposed: bool) -> jax.Array:
    fn = functools.partial(_dequantize_one, transposed=transposed)
    for _ in range(q.codes.ndim - 2):  # stacked layers: one quantized tensor per layer
        fn = jax.vmap(fn)
    return fn(q).astype(q.dtype if dtype is None else dtype)


def dequantize(q: QuantizedKernel, dtype: Any = None) -> jax.Array:
    """The float kernel [*stack, in, out] a `QuantizedKernel` stands for (default: its original dtype).

    >>> import lora_jax
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(16, 4)
    >>> q = lora_jax.quantize({"q": {"kernel": w}}, "int8", block_size=16)["q"]["kernel"]
    >>> float(np.abs(np.asarray(dequantize(q)) - w).max()) < 1 / 254
    True
    """
    return _dequantize(q, dtype, transposed=True)


def partition_specs(q: QuantizedKernel, kernel_spec: tuple, fits: Any = None) -> QuantizedKernel:
    """PartitionSpecs of the fields, derived from the kernel's spec (*S_stack, S_in, S_out).

    codes and absmax are [*stack, out, in/k]: they take (*S_stack, S_out, S_in); the block axis
    of absmax is left unsplit when `fits(shape, spec)` says the mesh cannot divide it (e.g. 576/64
    = 9 blocks over 2 devices). The second-level tables are tiny and replicated per layer.

    >>> from jax.sharding import PartitionSpec as P
    >>> q = QuantizedKernel("nf4", "float32", 4, np.zeros((3, 4), np.uint8), np.ones((3, 2), np.float32))
    >>> partition_specs(q, ("fsdp", "tensor")).codes
    P('tensor', 'fsdp')
    """
    from jax.sharding import PartitionSpec as P

    *stack, s_in, s_out = kernel_spec
    codes = P(*stack, s_out, s_in)
    absmax = P(*stack, s_out, s_in)
    if fits is not None and not fits(tuple(q.absmax.shape), absmax):
        absmax = P(*stack, s_out, None)
    nested = None if q.offset is None else P(*stack, None)
    return q.replace(codes=codes, absmax=absmax, nested_absmax=nested, nested_code=nested,
                     offset=None if q.offset is None else P(*stack))
