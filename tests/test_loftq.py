"""LoftQ against PEFT's loftq_init loop replayed on CPU with bitsandbytes' NF4 (PEFT itself runs it on
CUDA only): the same quantized base (same NF4 codes and block scales; dequantized values within 1 ulp) and the same B·A (per singular pair up to sign)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lora_jax
from lora_jax.quant.kernel import dequantize
from lora_jax.variants.loftq import loftq_init, loftq_one


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_matches_peft_loop_with_bitsandbytes(num_iter):
    import bitsandbytes.functional as bnbf
    from peft.utils.loftq_utils import _low_rank_decomposition

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    res = w.clone()
    for i in range(num_iter):  # peft.utils.loftq_utils.loftq_init, num_bits=4, on CPU
        packed, state = bnbf.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = bnbf.dequantize_4bit(packed, state)
        res = w - deq
        out = _low_rank_decomposition(res, reduced_rank=4)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = w - L @ R
    q, lora_a, lora_b = loftq_one(w.numpy(), 4, num_iter)
    np.testing.assert_allclose(np.asarray(dequantize(q, jnp.float32)).T, deq.numpy(), rtol=1e-6, atol=0)  # same codes; 1 ulp from op order
    np.testing.assert_allclose(lora_b @ lora_a, (L @ R).numpy(), atol=1e-5)
    assert np.abs(w.numpy() - deq.numpy() - lora_b @ lora_a).mean() < np.abs(w.numpy() - deq.numpy()).mean()


def test_loftq_tree_stacked_equals_per_layer_and_errors():
    w = jax.random.normal(jax.random.key(0), (2, 64, 32))
    cfg = lora_jax.LoraConfig(r=2, alpha=2, target_modules=["q"])
    stacked = loftq_init({"layers": {"q": {"kernel": w}}}, cfg, jax.random.key(1), num_iter=2,
                         layouts={"layers.q": lora_jax.KernelLayout(stack=1, n_in=1)})["layers"]["q"]
    for i in range(2):
        q, a, b = loftq_one(np.asarray(w[i]).T, 2, 2)
        np.testing.assert_array_equal(np.asarray(dequantize(stacked["kernel"]))[i], np.asarray(dequantize(q)))
        np.testing.assert_allclose(np.asarray(stacked["lora_a"][i] @ stacked["lora_b"][i]), (b @ a).T, atol=1e-6)
    with pytest.raises(ValueError, match="only 4 \\(NF4\\)"):
        loftq_init({"q": {"kernel": w[0]}}, cfg, jax.random.key(1), num_bits=8)
