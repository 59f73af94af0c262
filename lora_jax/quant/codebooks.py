"""The code books of blockwise quantization, exactly as bitsandbytes builds them.

* `NF4`: QLoRA's 4-bit NormalFloat — 16 quantiles of N(0, 1) scaled to [-1, 1] (8 negative
  levels, zero, 7 positive levels). The float32 values are bitsandbytes' `get_4bit_type("nf4")`
  (which equals `create_normal_map(0.9677083)` without its padding).
* `dynamic_map(signed)`: bitsandbytes' 8-bit "dynamic" data type (`create_dynamic_map`): a
  decimal exponent (1e-6 .. 1) with a shrinking linear fraction, 256 sorted float32 values. The
  signed map holds double quantization's absmax codes and AdamW-8bit's first moment, the unsigned
  one AdamW-8bit's second moment. bitsandbytes builds it with torch's float32 `linspace`, whose
  last bit depends on the CPU's vector width; we compute the same formula in float64 and round
  once (within 2 ulps of bitsandbytes' table: tests/test_quant.py). A pre-quantized checkpoint
  carries its own table (`nested_quant_map`), which is kept as is, so its dequantization is exact.
* `bounds(code)`: the midpoints between neighbouring levels; a value's code is the number of
  midpoints strictly below it (`torch.bucketize(x, bounds)`, bitsandbytes' reference kernels):
  round to the nearest level, ties to the lower one.
"""

from __future__ import annotations

import functools

import numpy as np

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed)`: 256 sorted float32 levels in [-1, 1] (or [0, 1]).

    >>> m = dynamic_map(True)
    >>> m.shape, round(float(m[0]), 5), float(m[-1]), float(dynamic_map(False)[0])
    ((256,), -0.99297, 1.0, 0.0)
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = np.linspace(0.1, 1.0, n)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        boundaries = np.linspace(0.1, 1.0, additional_items + 1)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    out = np.array(sorted(data), dtype=np.float32)
    out.setflags(write=False)
    return out


def bounds(code: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring levels of a sorted code book (float32).

    >>> bounds(np.array([-1.0, 0.0, 1.0], np.float32)).tolist()
    [-0.5, 0.5]
    """
    code = np.asarray(code, np.float32)
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)
