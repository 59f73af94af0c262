"""PEFT LoRA adapters <-> our param trees: `save_peft_adapter` and `load_peft_adapter`.

Our module keys are HF module names (docs/CONVENTIONS.md), so PEFT's tensor names are the module
key between a fixed prefix and suffix, and A/B are stored transposed:

    ('model','layers','0','self_attn','q_proj','lora_a')  A [in, r]
        <->  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    ('model','layers','0','self_attn','q_proj','lora_b')  B [r, out]
        <->  base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]
    ('transformer','h','0','attn','c_attn','lora_a')      (GPT-2 Conv1D: same rule, fan_in_fan_out=true)
    stacked ('model','layers','self_attn','q_proj','lora_a') A [L, in, r]  -> one tensor per layer
    (...,'q_proj','lora_magnitude')  m [out]  <->  ...q_proj.lora_magnitude_vector [out]   (DoRA, use_dora)

The scale PEFT applies is alpha/r (or alpha/sqrt(r)) looked up for the HF module name; ours is the
adapter's own `lora_scale` leaf (one per layer in a stack). Export therefore checks, module by
module, that the written config gives PEFT the rank in the file and the alpha that reproduces our
scale, pinning exact-name rank/alpha patterns where the user's patterns alone would not; import
does the reverse (scales from the config). A stack whose layers differ in rank or skip layers
(`lora_rank` leaf) is written layer by layer with each layer's true rank, skipped layers left out
(the config's `layers_to_transform` / `exclude_modules` say so to PEFT); importing such an adapter
into a stacked model pads A/B to the largest rank and adds the `lora_rank` leaf back.
Every tensor in an adapter file must land somewhere, and every module the config targets must have
weights: anything else is a one-line ValueError, never silently skipped.

Files: adapter_names.py (file and tensor names), adapter_save.py (the writer), adapter_load.py (the
reader); this module re-exports them.

>>> from lora_jax.interop.adapter import CONFIG_FILE, load_peft_adapter, save_peft_adapter
"""

from lora_jax.interop.adapter_load import load_peft_adapter, read_adapter
from lora_jax.interop.adapter_names import (CONFIG_FILE, PREFIX, WEIGHTS_FILE, _node, _pin, _split_name,  # noqa: F401  (re-exported)
                                            is_stacked_key, kernel_modules)
from lora_jax.interop.adapter_save import _alpha_of, save_peft_adapter  # noqa: F401  (re-exported)

__all__ = ["CONFIG_FILE", "PREFIX", "WEIGHTS_FILE", "is_stacked_key", "kernel_modules", "load_peft_adapter", "read_adapter",
           "save_peft_adapter"]
