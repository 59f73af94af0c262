"""lora_jax: LoRA fine-tuning for JAX/Flax as a pure transform of the parameter tree.

The public API, one name per line (everything else is internal):
"""

from lora_jax.config import ALL_LINEAR, LoraConfig
from lora_jax.generation import chat, generate
from lora_jax.intercept import apply, kernel_layouts
from lora_jax.layers import Dense, lora_delta
from lora_jax.optim import lora_value_and_grad, optimizer, param_labels
from lora_jax.summary import count_parameters, print_trainable_parameters, trainable_parameters_line
from lora_jax.targeting import KernelLayout, select_targets
from lora_jax.transform import combine, delta_weight, has_lora, inject, merge, split, trainable_mask, unmerge

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "Dense",
    "KernelLayout",
    "LoraConfig",
    "apply",
    "chat",
    "combine",
    "count_parameters",
    "delta_weight",
    "generate",
    "has_lora",
    "inject",
    "kernel_layouts",
    "lora_delta",
    "lora_value_and_grad",
    "merge",
    "optimizer",
    "param_labels",
    "print_trainable_parameters",
    "select_targets",
    "split",
    "trainable_mask",
    "trainable_parameters_line",
    "unmerge",
]
