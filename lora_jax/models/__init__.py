"""Flax causal LMs that load Hugging Face checkpoints: Llama family (Llama 2/3/3.x, SmolLM, Mistral,
Qwen2, Qwen3), GPT-2, Gemma 2/3 (text) and Qwen3-MoE, with param paths equal to HF module names
(docs/CONVENTIONS.md). Each family is one module of `families/` (the registry: model, HF
model_types, naming, sharding rules, PEFT target_parameters, GGUF mapping).

    model, params, hf_config = from_pretrained("path/to/hf_dir", dtype="bfloat16", scan_layers=True)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask=None, positions=None, cache=None)
    cache = init_cache(model.cfg, batch, max_len, dtype)   # KV cache for incremental decoding

Files: config.py (ModelConfig), families/ (one module per family + the registry), blocks.py (shared
norms, MLP, attention, head), causal_lm.py (the shared CausalLM), moe.py (router, grouped experts,
expert parallelism), llama.py / gpt2.py (re-exports), attention.py (the attention entry
point, mask description, KV cache), masks.py (AttentionMask), attn_dispatch.py (which
implementation serves a call), attn_reference.py / attn_cudnn.py / attn_splash.py (the
implementations), rope.py, stack.py (unrolled / scanned / rematerialised blocks), build.py
(build_model), naming.py (HF state dict <-> param tree), loading.py (from_pretrained).

>>> from lora_jax.models import ModelConfig, build_model
>>> build_model(ModelConfig("llama", 32, 16, 32, 2, 4, 2, 4)).cfg.num_layers
2
"""

from lora_jax.models.attention import init_cache
from lora_jax.models.build import build_model, param_shapes
from lora_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from lora_jax.models.loading import from_pretrained, read_checkpoint
from lora_jax.models.naming import from_hf_state_dict, hf_module_name, stack_layers, to_hf_state_dict, unstack_layers

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "build_model",
    "from_hf_state_dict",
    "from_pretrained",
    "hf_module_name",
    "init_cache",
    "param_shapes",
    "read_checkpoint",
    "stack_layers",
    "to_hf_state_dict",
    "unstack_layers",
]
