"""Shared fixtures: tiny random Hugging Face checkpoints, built once per test session.

`tiny_checkpoint(name)` -> (checkpoint dir, torch model in eval mode). Each model is instantiated
with a fixed torch seed, its weights redrawn at a scale that makes logits O(1) (HF's init leaves
biases at zero and norms at one, which would hide mapping errors), and saved with
`save_pretrained(dir, safe_serialization=True)`. Other test files may add entries to TINY_CONFIGS.
"""

from __future__ import annotations

import pytest

VOCAB = 96

# The files that take a minute or more run first: the 2 xdist workers take one file at a time
# (--dist loadfile), so a heavy file left for the end keeps one worker busy while the other idles.
HEAVY_FIRST = ("test_train_cli.py", "test_quant.py", "test_sharding.py", "test_attention.py", "test_bench_gpu.py",
               "test_train_multihost.py", "test_train_resume.py", "test_generation.py", "test_families_sharding.py",
               "test_quant_loading.py", "test_dora.py", "test_gguf.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: test order within a file kept


def _tiny_configs():
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
    return {
        # Llama, GQA 4:2, untied head
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False),
        # Llama 3.x rope scaling (a short original context so every band is touched), tied head
        "llama3": lambda: tf.LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=True,
                                         rope_theta=500000.0,
                                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        # Mistral with a sliding window shorter than the test sequence
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False),
        # Qwen2: q/k/v bias, tied head
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
        # Qwen2 with sliding-window attention on layer 1 only (layer_types: full, sliding)
        "qwen2_swa": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                            use_sliding_window=True, sliding_window=3, max_window_layers=1),
        # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads, biases everywhere in attention, untied
        "qwen3": lambda: tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=24, attention_bias=True,
                                        tie_word_embeddings=False),
        # GPT-2: Conv1D, learned positions, LayerNorm, tied head
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    }


TINY_CONFIGS = _tiny_configs()


def _randomize(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = p.ndim == 1 and any(s in name for s in ("norm", "ln_"))
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "wpe" in name or "embed" in name or "wte" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else 0.2 * noise)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    import torch
    import transformers as tf

    torch.set_num_threads(1)
    built: dict = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(0)
            hf_config = TINY_CONFIGS[name]()
            model = tf.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
            _randomize(model, seed=sum(map(ord, name)))
            model.eval()
            path = tmp_path_factory.mktemp(f"tiny_{name}")
            model.save_pretrained(path, safe_serialization=True)
            built[name] = (str(path), model)
        return built[name]

    return get


@pytest.fixture(scope="session")
def padded_batch():
    """(input_ids [2, 8] int32, attention_mask [2, 8]): row 1 is left-padded by 3."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(2, 8)).astype(np.int32)
    mask = np.ones((2, 8), np.int32)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask
