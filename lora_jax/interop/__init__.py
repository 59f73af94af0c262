"""Interop with PyTorch: PEFT LoRA adapters in and out, merged Hugging Face checkpoints out.

    save_peft_adapter(params, lora_config, out_dir, model_config=model.cfg)   # -> PEFT adapter dir
    params, lora_config = load_peft_adapter(params, adapter_dir)              # any PEFT LoRA adapter
    save_merged(params, lora_config, out_dir, hf_config=hf_config, dtype="bfloat16")  # -> HF checkpoint

(the `lora-jax export` command is the program's: train/export.py). Files: adapter.py (tensor names and
orientation; adapter_names.py, the writer adapter_save.py, the reader adapter_load.py), peft_config.py
(adapter_config.json), merged.py (merged checkpoints, sharding), _files.py (atomic output directories).

>>> from lora_jax.interop import save_peft_adapter, load_peft_adapter, save_merged
"""

from lora_jax.interop.adapter import load_peft_adapter, read_adapter, save_peft_adapter
from lora_jax.interop.merged import save_merged

__all__ = ["load_peft_adapter", "read_adapter", "save_merged", "save_peft_adapter"]
