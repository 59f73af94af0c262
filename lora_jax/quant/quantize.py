"""`quantize`: turn the frozen kernels of a param tree into `QuantizedKernel`s (NF4 or int8).

    params = lora_jax.quantize(params, "nf4", block_size=64, double_quant=True)   # QLoRA's base
    params = lora_jax.inject(params, lora_config, key)                            # adapters stay fp32

What is quantized: every `kernel` leaf (the Dense projections) except the modules in
`skip_modules` — by default the LM head, as QLoRA and bitsandbytes leave it. Embeddings and norms
are not kernels and are never quantized; LoRA leaves are never touched.

The arithmetic is bitsandbytes' reference kernels' (`quantize_4bit`, `quantize_blockwise`), done
on the host with numpy, one tensor (one layer of a stacked kernel) at a time:

1. the weight in PyTorch's orientation [out, in] is cut into blocks of `block_size` consecutive
   inputs; `absmax` = max |w| per block (float32);
2. `w * (1 / absmax)`, clipped to [-1, 1], is rounded to the nearest NF4 level (ties to the lower
   one); two codes are packed per byte, the first in the high nibble. int8: the nearest multiple
   of 1/127 (ties to even), stored as int8;
3. double quantization: `offset` = mean(absmax); `absmax - offset` is quantized again in blocks of
   256 with the signed 8-bit dynamic code book and one float32 scale per block.

The offset is the float32 rounding of the exact mean (bitsandbytes sums in float32, in an order
torch chooses, so its last bit may differ); everything else is bit-identical to bitsandbytes'
CPU `quantize_4bit` (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.codebooks import NF4, bounds, dynamic_map
from lora_jax.quant.kernel import NESTED_BLOCK, SCHEMES, QuantizedKernel, is_quantized
from lora_jax.targeting import module_key
from lora_jax.tree import KERNEL, iter_leaves, put

BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TINY = np.float32(1e-38)  # bitsandbytes clamps a block's absmax to this before taking 1/absmax


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model's frozen kernels (see the module docstring).

    skip_modules: module names (matched like `target_modules`: the key itself or a `.`-suffix of
    it), or one regex full-matched against the module key, kept in full precision.

    >>> QuantConfig("nf4").skips("lm_head"), QuantConfig("nf4").skips("model.layers.0.mlp.up_proj")
    (True, False)
    """

    scheme: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    skip_modules: tuple[str, ...] | str = ("lm_head",)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantize scheme {self.scheme!r} is not supported; use one of {', '.join(SCHEMES)}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"quantize block_size={self.block_size} is not supported; use one of {BLOCK_SIZES}")
        if not isinstance(self.skip_modules, str):
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules or ()))

    def skips(self, key: str) -> bool:
        import re

        if isinstance(self.skip_modules, str):
            return re.fullmatch(self.skip_modules, key) is not None
        return any(key == s or key.endswith("." + s) for s in self.skip_modules)


def _blockwise(x: np.ndarray, block: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [..., n], absmax float32 [..., ceil(n / block)]) of x [..., n], flat blocks."""
    n = x.shape[-1]
    pad = -n % block
    xb = np.pad(x.astype(np.float32), [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(*x.shape[:-1], -1, block)
    absmax = np.abs(xb).max(axis=-1).astype(np.float32)  # zero padding leaves a partial block's max as is
    inv = (np.float32(1.0) / np.maximum(absmax, TINY)).astype(np.float32)
    scaled = np.clip(xb * inv[..., None], np.float32(-1.0), np.float32(1.0)).astype(np.float32)
    q = np.searchsorted(bounds(code), scaled, side="left").astype(np.uint8)
    return q.reshape(*x.shape[:-1], -1)[..., :n], absmax


def _quantize_one(w_t: np.ndarray, config: QuantConfig) -> dict[str, np.ndarray]:
    """Fields of one unstacked kernel given its weight in PyTorch orientation [out, in]."""
    out, n_in = w_t.shape
    bs = config.block_size
    blocks = w_t.astype(np.float32).reshape(out, n_in // bs, bs)
    absmax = np.abs(blocks).max(axis=-1).astype(np.float32)
    inv = (np.float32(1.0) / np.maximum(absmax, TINY)).astype(np.float32)
    scaled = np.clip(blocks * inv[..., None], np.float32(-1.0), np.float32(1.0)).astype(np.float32)
    if config.scheme == "nf4":
        q = np.searchsorted(bounds(NF4), scaled, side="left").astype(np.uint8).reshape(out, n_in)
        codes = (q[:, 0::2] << 4) | q[:, 1::2]
    else:
        codes = np.rint(scaled * np.float32(127.0)).astype(np.int8).reshape(out, n_in)
    fields = {"codes": codes, "absmax": absmax}
    if config.double_quant:
        offset = np.float32(absmax.astype(np.float64).mean())
        q2, absmax2 = _blockwise((absmax - offset).astype(np.float32).reshape(1, -1), NESTED_BLOCK, dynamic_map(True))
        fields.update(absmax=q2.reshape(out, n_in // bs), nested_absmax=absmax2[0], nested_code=dynamic_map(True).copy(),
                      offset=np.asarray(offset, np.float32))
    return fields


def quantize_kernel(kernel: Any, config: QuantConfig, name: str = "kernel") -> QuantizedKernel:
    """A float kernel [*stack, in, out] (numpy or jax) -> `QuantizedKernel` with numpy fields.

    >>> q = quantize_kernel(np.ones((64, 8), np.float32), QuantConfig("nf4"))
    >>> q.shape, q.codes.shape, q.absmax.dtype.name
    ((64, 8), (8, 32), 'uint8')
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"cannot quantize {name!r} of shape {kernel.shape}: a kernel has at least 2 axes")
    n_in = kernel.shape[-2]
    if n_in % config.block_size:
        ok = [b for b in BLOCK_SIZES if n_in % b == 0]
        raise ValueError(f"cannot quantize {name!r} {kernel.shape}: its input size {n_in} is not a multiple of "
                         f"block_size={config.block_size}; use a block size in {ok} (recipe: model.quant_block_size) "
                         "or skip the module (skip_modules)")
    stack = kernel.shape[:-2]
    per_layer = [_quantize_one(kernel[i].T, config) for i in np.ndindex(*stack)] if stack else [_quantize_one(kernel.T, config)]
    fields = {k: (np.stack([f[k] for f in per_layer]).reshape(*stack, *per_layer[0][k].shape) if stack else per_layer[0][k])
              for k in per_layer[0]}
    return QuantizedKernel(config.scheme, jnp.dtype(kernel.dtype).name, config.block_size, **fields)


def quantize(params: Any, scheme: str = "nf4", block_size: int = 64, double_quant: bool = True,
             skip_modules: tuple[str, ...] | str = ("lm_head",)) -> Any:
    """Quantize every frozen kernel of `params` (module docstring); returns a new tree.

    Numpy leaves give numpy fields (host memory, for `lora_jax.sharding.load_sharded`); jax
    arrays give jax arrays. Kernels already quantized are left as they are.

    >>> import lora_jax
    >>> p = {"q_proj": {"kernel": np.ones((64, 8), np.float32)}, "lm_head": {"kernel": np.ones((64, 8), np.float32)}}
    >>> q = quantize(p, "nf4")
    >>> type(q["q_proj"]["kernel"]).__name__, type(q["lm_head"]["kernel"]).__name__
    ('QuantizedKernel', 'ndarray')
    """
    config = QuantConfig(scheme, block_size, double_quant, skip_modules)
    out: dict = {}
    for path, leaf in iter_leaves(params):
        if path[-1] == KERNEL and not is_quantized(leaf) and not config.skips(module_key(path)):
            on_host = isinstance(leaf, np.ndarray)
            leaf = quantize_kernel(jax.device_get(leaf), config, ".".join(path))
            if not on_host:
                leaf = jax.tree.map(jnp.asarray, leaf)
        put(out, path, leaf)
    return out


def dequantize_params(params: Any, dtype: Any = None, warn: bool = False) -> Any:
    """Every `QuantizedKernel` in the tree replaced by its float kernel (original dtype by default).

    warn=True: a one-line warning that the result is the quantized base's values (what merging
    into a quantized base and writing a full-precision checkpoint of it gives).

    >>> p = quantize({"q": {"kernel": np.ones((64, 4), np.float32)}}, "nf4")
    >>> dequantize_params(p)["q"]["kernel"].shape
    (64, 4)
    """
    from lora_jax.quant.kernel import dequantize

    out: dict = {}
    found = []
    for path, leaf in iter_leaves(params):
        if is_quantized(leaf):
            found.append(leaf.scheme)
            leaf = dequantize(leaf, dtype)
        put(out, path, leaf)
    if warn and found:
        import warnings

        warnings.warn(f"merging into a {found[0]}-quantized base: the merged weights are the dequantized base + ΔW, "
                      "so they differ from the original full-precision weights by the quantization rounding", stacklevel=3)
    return out


def has_quantized(params: Any) -> bool:
    """Whether any kernel in the tree is a `QuantizedKernel`.

    >>> has_quantized({"q": {"kernel": np.ones((2, 2))}})
    False
    """
    return any(is_quantized(leaf) for _, leaf in iter_leaves(params))
