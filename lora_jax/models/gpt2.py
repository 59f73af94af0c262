"""GPT-2's modules; they live in `lora_jax.models.families.gpt2` (kept importable here).

>>> GPT2LMHeadModel.decoder_name
'transformer'
"""

from lora_jax.models.families.gpt2 import GPT2Block, GPT2LMHeadModel, GPT2Model  # noqa: F401
