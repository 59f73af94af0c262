"""QLoRA's pieces in JAX: a 4-bit (NF4) or 8-bit frozen base and an 8-bit AdamW.

    codebooks   NF4 and the 8-bit dynamic code book, as bitsandbytes builds them
    kernel      `QuantizedKernel`: the pytree node at a kernel's place; dequantization; its specs
    quantize    `quantize(params, "nf4" | "int8", block_size, double_quant)` (numpy, per tensor)
    matmul      `quantized_dot`: dequantize-on-the-fly matmul that keeps only codes for the backward
    loading     quantize while reading a checkpoint; bitsandbytes `*-bnb-4bit` checkpoints as is
    adamw8bit   `adamw_8bit`: optax AdamW with both moments in blockwise dynamic 8-bit

>>> import numpy as np, lora_jax
>>> q = lora_jax.quantize({"q_proj": {"kernel": np.ones((64, 16), np.float32)}})["q_proj"]["kernel"]
>>> q.scheme, q.shape, q.codes.dtype.name
('nf4', (64, 16), 'uint8')
"""

from lora_jax.quant.adamw8bit import adamw_8bit, scale_by_adam_8bit, state_bytes
from lora_jax.quant.codebooks import NF4, dynamic_map
from lora_jax.quant.kernel import QuantizedKernel, dequantize, dequantize_t, is_quantized, partition_specs
from lora_jax.quant.matmul import quantized_dot
from lora_jax.quant.quantize import QuantConfig, dequantize_params, has_quantized, quantize, quantize_kernel

__all__ = [
    "NF4",
    "QuantConfig",
    "QuantizedKernel",
    "adamw_8bit",
    "dequantize",
    "dequantize_params",
    "dequantize_t",
    "dynamic_map",
    "has_quantized",
    "is_quantized",
    "partition_specs",
    "quantize",
    "quantize_kernel",
    "quantized_dot",
    "scale_by_adam_8bit",
    "state_bytes",
]
