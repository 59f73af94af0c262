"""lora_jax: LoRA fine-tuning for JAX/Flax as a pure transform of the parameter tree.

The public API is what this module re-exports (everything else is internal). Where things live:

    lora_jax.config / targeting / transform / layers / intercept / optim / summary   the LoRA core
    lora_jax.tree          paths, get/put/filter of param trees and the leaf kinds (kernel, lora_a, ...)
    lora_jax.models        Flax Llama / Mistral / Qwen2 / Qwen3 / GPT-2 / Gemma 2/3 / Qwen3-MoE (one module per family), HF safetensors + GGUF import
    lora_jax.generation    KV-cache generation and chat templates
    lora_jax.interop       PEFT adapters in and out, merged HF checkpoints out
    lora_jax.nnx           LoRA for flax.nnx models (LoraParam variables, merge, PEFT in/out)
    lora_jax.quant         QLoRA: NF4 / int8 frozen kernels, bitsandbytes checkpoints, 8-bit AdamW
    lora_jax.sharding      meshes, partition rules, sharded placement, jax.distributed
    lora_jax.training      the compiled train / eval step, loss, orbax checkpoints
    lora_jax.variants      DoRA, PiSSA/OLoRA/LoftQ inits, LoRA+
    lora_jax.adapters      many adapters on one base: named adapters, merging, per-example adapters

>>> import lora_jax
>>> lora_jax.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]).scale_for("q_proj")
2.0
"""

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.generation import chat, generate
from lora_jax.intercept import apply, kernel_layouts
from lora_jax.layers import Dense, lora_delta
from lora_jax.optim import lora_value_and_grad, optimizer, param_labels
from lora_jax.quant import dequantize, quantize
from lora_jax.summary import count_parameters, print_trainable_parameters, trainable_parameters_line
from lora_jax.targeting import KernelLayout, select_targets
from lora_jax.transform import combine, delta_weight, has_lora, inject, merge, split, split_constants, trainable_mask, unmerge

# Subpackages, after the core they build on.
from lora_jax import adapters, generation, interop, models, nnx, quant, sharding, training, tree, variants  # noqa: E402  isort: skip
from lora_jax.interop import load_peft_adapter, save_merged, save_peft_adapter  # noqa: E402
from lora_jax.models import from_pretrained  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "Dense",
    "KernelLayout",
    "LoraConfig",
    "adapters",
    "apply",
    "chat",
    "combine",
    "count_parameters",
    "delta_weight",
    "dequantize",
    "from_pretrained",
    "generate",
    "generation",
    "has_lora",
    "inject",
    "interop",
    "kernel_layouts",
    "load_peft_adapter",
    "lora_delta",
    "lora_value_and_grad",
    "merge",
    "models",
    "nnx",
    "optimizer",
    "param_labels",
    "print_trainable_parameters",
    "quant",
    "quantize",
    "save_merged",
    "save_peft_adapter",
    "select_targets",
    "sharding",
    "split",
    "split_constants",
    "trainable_mask",
    "trainable_parameters_line",
    "training",
    "tree",
    "unmerge",
    "variants",
]
