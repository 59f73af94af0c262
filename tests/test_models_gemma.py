"""Gemma 2 and Gemma 3 (text) against transformers on tiny random checkpoints: logits (unrolled and
scanned, left padding), PEFT adapters both ways, greedy generation. Sharding: tests/test_families_sharding.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lora_jax
from conftest import TINY_CONFIGS, VOCAB
from lora_jax.generation import generate
from lora_jax.interop import load_peft_adapter, save_peft_adapter
from lora_jax.models import from_pretrained
from parity import hf_base, hf_logits, our_logits, randomize_lora, torch_logits

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5,
               query_pre_attn_scalar=12, sliding_window=3)


def _gemma2():
    import transformers as tf

    # small caps so tanh bends the scores and logits (the real 50 / 30 barely touch O(1) values)
    return tf.Gemma2Config(**_COMMON, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                           layer_types=["sliding_attention", "full_attention"])


def _gemma3():
    import transformers as tf

    rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    return tf.Gemma3TextConfig(**_COMMON, rope_parameters=rope, layer_types=["sliding_attention", "full_attention"],
                               tie_word_embeddings=False)  # untied: its greedy continuation does not just repeat


TINY_CONFIGS.update(gemma2=_gemma2, gemma3=_gemma3)
GEMMAS = ["gemma2", "gemma3"]


@functools.lru_cache(maxsize=None)
def _loaded(path: str, scan: bool):
    model, params, _ = from_pretrained(path, scan_layers=scan)
    return model, params


@pytest.mark.parametrize("name,scan", [("gemma2", True), ("gemma3", False), ("gemma3", True)],
                         ids=["gemma2-scan", "gemma3-unrolled", "gemma3-scan"])  # gemma2 unrolled: the PEFT test
def test_logits_match_transformers(name, scan, tiny_checkpoint, padded_batch):
    path, torch_model = tiny_checkpoint(name)
    ids, mask = padded_batch
    model, params = _loaded(path, scan)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))[0])
    expected = torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(logits[real] - expected[real]).max()
    assert diff <= 1e-4, f"{name} scan={scan}: max |Δlogits| = {diff}"
    assert np.abs(expected[real]).max() > 0.5


def test_config_reads_every_gemma_setting(tiny_checkpoint):
    g2 = _loaded(tiny_checkpoint("gemma2")[0], False)[0].cfg
    assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window, g2.sliding_layers) == (2.0, 3.0, 3, (True, False))
    assert g2.attn_scale == 12**-0.5 and g2.norm_plus_one and g2.embed_scale and g2.tie_word_embeddings
    assert "lm_head" not in _loaded(tiny_checkpoint("gemma2")[0], False)[1]
    assert g2.rope_local_theta is None and not g2.qk_norm
    g3 = _loaded(tiny_checkpoint("gemma3")[0], False)[0].cfg
    assert g3.qk_norm and g3.final_softcap is None and g3.attn_softcap is None
    assert (g3.rope_theta, dict(g3.rope_scaling)["factor"], g3.rope_local_theta) == (1e6, 2.0, 100.0)
    assert g3.family == "gemma" and lora_jax.sharding.default_rules("gemma3_text")


@pytest.mark.parametrize("name", GEMMAS)
def test_peft_adapters_both_ways(name, tiny_checkpoint, tmp_path):
    """PEFT's random adapter loads and reproduces PeftModel; ours (scanned) exports and PeftModel reproduces it."""
    import peft

    path, _ = tiny_checkpoint(name)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_base(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          init_lora_weights=False))
    pm.save_pretrained(tmp_path / "theirs")
    model, params = _loaded(path, False)
    loaded, lcfg = load_peft_adapter(params, tmp_path / "theirs")
    theirs = hf_logits(pm.eval())
    np.testing.assert_allclose(our_logits(model.clone(lora=lcfg), loaded), theirs, atol=1e-4, rtol=0)

    smodel, sparams = _loaded(path, True)
    lcfg = lora_jax.LoraConfig(r=2, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])
    adapted = randomize_lora(lora_jax.inject(sparams, lcfg, jax.random.key(1)), seed=3)
    save_peft_adapter(adapted, lcfg, tmp_path / "ours", model_config=smodel.cfg)
    back = peft.PeftModel.from_pretrained(hf_base(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(back), our_logits(smodel.clone(lora=lcfg), adapted), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", GEMMAS)
def test_greedy_generation_matches_transformers(name, tiny_checkpoint):
    """Left-padded batch, 6 new tokens: crosses the sliding window (3) on the KV-cache path."""
    path, hf = tiny_checkpoint(name)
    ids = np.array([[0, 0, 5, 17, 33, 2], [11, 3, 60, 8, 21, 5]], np.int64)
    mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int64)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = out[:, ids.shape[1]:].numpy()
    model, params = _loaded(path, True)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=6)[:, ids.shape[1]:], expected)
    if name == "gemma3":
        assert all(len(set(row)) > 2 for row in expected.tolist())  # a continuation, not one repeated token
