"""The Llama family's modules; they live in `lora_jax.models.families.llama` (kept importable here).

>>> LlamaForCausalLM.decoder_name
'model'
"""

from lora_jax.models.blocks import RMSNorm, activation  # noqa: F401
from lora_jax.models.families.llama import (  # noqa: F401
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
