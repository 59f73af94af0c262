"""LoftQ: quantize the targeted kernels to NF4 and start A, B from the quantization error — PEFT's
`init_lora_weights="loftq"` (`peft.utils.loftq_utils.loftq_init`) on our trees.

Per targeted kernel, in PyTorch's orientation Wt [out, in] (fp32), for `num_iter` rounds:

    Q   = NF4(res)  (blocksize 64, no double quantization: bitsandbytes' Params4bit(compress_statistics=False))
    res = Wt - deq(Q);  U S Vh = svd(res);  B = U_r sqrt(S_r),  A = sqrt(S_r) Vh_r
    res = Wt - B A                                            (before the next round)

The base becomes the NF4 kernel Q (a `lora_jax.quant.QuantizedKernel`, which dequantizes to exactly
what bitsandbytes gives) and the adapter A, B. As in PEFT, A and B carry no 1/scale: the adapted layer
is deq(Q) + s·B·A, which approximates W best with s = 1 (lora_alpha = r). PEFT runs this on CUDA
only; our NF4 is bitsandbytes' bit for bit, so the test replays PEFT's loop with bitsandbytes' CPU
functions. `num_bits=8` (bitsandbytes' LLM.int8 vector-wise format, not our block-wise int8) is refused.
An adapter made this way applies to the LoftQ-quantized base, which is saved with it (PEFT likewise).

>>> import jax, jax.numpy as jnp, lora_jax
>>> p = {"q": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
>>> out = loftq_init(p, lora_jax.LoraConfig(r=4, alpha=4, target_modules=["q"]), jax.random.key(1))
>>> type(out["q"]["kernel"]).__name__, out["q"]["lora_a"].shape
('QuantizedKernel', (64, 4))
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.config import LoraConfig
from lora_jax.quant.kernel import dequantize
from lora_jax.quant.quantize import QuantConfig, quantize_kernel
from lora_jax.tree import KERNEL, LORA_A, LORA_B, LORA_MAGNITUDE, get, iter_leaves, put


def _low_rank(res: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's _low_rank_decomposition: (L = U_r sqrt(S_r) [out, r], R = sqrt(S_r) Vh_r [r, in])."""
    u, s, vh = np.linalg.svd(res, full_matrices=False)
    root = np.sqrt(s[:r]).astype(np.float32)
    return (u[:, :r] * root).astype(np.float32), (root[:, None] * vh[:r]).astype(np.float32)


def loftq_one(w_t: np.ndarray, r: int, num_iter: int = 1, block_size: int = 64):
    """(QuantizedKernel of the [in, out] kernel, A [r, in], B [out, r]) for one weight Wt [out, in]."""
    w_t = np.asarray(w_t, np.float32)
    cfg = QuantConfig("nf4", block_size, double_quant=False, skip_modules=())
    res = w_t
    for i in range(num_iter):
        q = quantize_kernel(res.T, cfg)
        deq_t = np.asarray(dequantize(q, jnp.float32)).T
        res = w_t - deq_t
        lo, ro = _low_rank(res, r)
        if i + 1 == num_iter:
            break
        res = w_t - lo @ ro
    return q, ro, lo


def loftq_init(params: Any, config: LoraConfig, rng: jax.Array, *, num_bits: int = 4, num_iter: int = 1,
               block_size: int = 64, layouts: Mapping | None = None) -> Any:
    """`lora_jax.inject` with LoftQ's init: targeted kernels become NF4, A/B the low-rank error (module docstring)."""
    import lora_jax

    if num_bits != 4:
        raise ValueError(f"LoftQ num_bits={num_bits}: only 4 (NF4) is supported; PEFT's 8-bit LoftQ uses bitsandbytes' "
                         "LLM.int8 format, which lora_jax does not implement")
    if num_iter < 1:
        raise ValueError(f"LoftQ num_iter must be >= 1, got {num_iter}")
    if config.use_dora:
        raise ValueError("LoftQ with use_dora is not supported; use one of them")
    out = lora_jax.inject(params, config, rng, layouts=layouts)
    for path, _ in list(iter_leaves(out)):
        if path[-1] != LORA_A:
            continue
        node = get(out, path[:-1])
        kernel = np.asarray(node[KERNEL], np.float32)
        a, b = node[LORA_A], node[LORA_B]
        d_in, r, d_out = a.shape[-2], a.shape[-1], b.shape[-1]
        if kernel.shape[-2:] != (d_in, d_out):
            raise ValueError(f"LoftQ needs a 2-D [in, out] kernel (optionally stacked) at {'.'.join(path[:-1])!r}")
        stack = kernel.shape[:-2]
        qs, As, Bs = [], [], []
        for idx in (np.ndindex(*stack) if stack else [()]):
            q, lora_a, lora_b = loftq_one(kernel[idx].T, r, num_iter, block_size)
            qs.append(q)
            As.append(lora_a.T)
            Bs.append(lora_b.T)
        if stack:
            fields = {f: np.stack([getattr(q, f) for q in qs]).reshape(stack + getattr(qs[0], f).shape)
                      for f in ("codes", "absmax")}
            node[KERNEL] = qs[0].replace(**fields)
        else:
            node[KERNEL] = qs[0]
        node[LORA_A] = jnp.asarray(np.stack(As).reshape(stack + (d_in, r)), a.dtype)
        node[LORA_B] = jnp.asarray(np.stack(Bs).reshape(stack + (r, d_out)), b.dtype)
        assert LORA_MAGNITUDE not in node
    return out
