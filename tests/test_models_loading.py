"""from_pretrained's errors, sharded/pickled checkpoints, and the HF naming round trip."""

import json
import os
import shutil

import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

from lora_jax.models import ModelConfig, from_pretrained, hf_module_name, stack_layers, to_hf_state_dict, unstack_layers
from lora_jax.models.loading import read_safetensors
from parity import loaded


def test_unsupported_architecture_lists_supported(tmp_path):
    transformers.GPTNeoXConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt_neox'.*llama, mistral, qwen2, qwen3, gpt2"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported"):
        ModelConfig.from_hf(transformers.PhiConfig())


def test_unsupported_rope_type():
    hf = transformers.LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        ModelConfig.from_hf(hf)


def test_missing_files(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "model.gguf")
    shutil.copy(os.path.join(tiny_checkpoint("llama")[0], "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        from_pretrained(tmp_path)


def _copy_with(src, dst, tensors):
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def test_bad_shape_and_missing_tensor(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama")[0]
    tensors = read_safetensors([os.path.join(src, "model.safetensors")])
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = dict(tensors, **{name: np.zeros((16, 64), np.float32)})
    _copy_with(src, tmp_path / "bad", bad)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\) but the config needs \(32, 64\)"):
        from_pretrained(tmp_path / "bad")
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    _copy_with(src, tmp_path / "missing", missing)
    with pytest.raises(ValueError, match="no tensor 'model.norm.weight'"):
        from_pretrained(tmp_path / "missing")


def test_sharded_and_pickled_checkpoints(tmp_path, tiny_checkpoint):
    path, torch_model = tiny_checkpoint("qwen3")
    _, ref, _ = loaded(path, False)
    torch_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    _, sharded, _ = from_pretrained(tmp_path / "sharded")
    np.testing.assert_array_equal(sharded["lm_head"]["kernel"], ref["lm_head"]["kernel"])
    import torch

    os.makedirs(tmp_path / "pickled")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "pickled" / "config.json")
    torch.save(torch_model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    _, pickled, _ = from_pretrained(tmp_path / "pickled")
    np.testing.assert_array_equal(pickled["model"]["layers"]["1"]["self_attn"]["q_norm"]["scale"],
                                  ref["model"]["layers"]["1"]["self_attn"]["q_norm"]["scale"])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_to_hf_state_dict_round_trips(name, tiny_checkpoint):
    path, torch_model = tiny_checkpoint(name)
    _, params, _ = loaded(path, True)
    hf = to_hf_state_dict(params, loaded(path, True)[0].cfg)
    theirs = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()
              if not (k == "lm_head.weight" and torch_model.config.tie_word_embeddings)}
    assert set(hf) == set(theirs)
    for k in hf:
        np.testing.assert_array_equal(hf[k], theirs[k], err_msg=k)


@pytest.mark.parametrize("scan", [False, True])
def test_host_loading_gives_the_same_params_as_numpy(scan, tiny_checkpoint):
    import jax

    path, _ = tiny_checkpoint("llama")
    _, on_device, _ = from_pretrained(path, scan_layers=scan)
    _, on_host, _ = from_pretrained(path, scan_layers=scan, param_dtype="bfloat16", host=True)
    assert jax.tree.structure(on_host) == jax.tree.structure(on_device)
    for h, d in zip(jax.tree.leaves(on_host), jax.tree.leaves(on_device)):
        assert type(h) is np.ndarray and h.dtype == np.dtype("bfloat16") and h.shape == d.shape
        np.testing.assert_array_equal(h, np.asarray(d).astype("bfloat16"))


def test_stack_unstack_and_module_names(tiny_checkpoint):
    _, flat, _ = loaded(tiny_checkpoint("llama")[0], False)
    _, stacked, _ = loaded(tiny_checkpoint("llama")[0], True)
    restacked = stack_layers(flat)
    np.testing.assert_array_equal(restacked["model"]["layers"]["mlp"]["up_proj"]["kernel"],
                                  stacked["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    unstacked = unstack_layers(stacked)
    assert sorted(unstacked["model"]["layers"]) == ["0", "1"]
    np.testing.assert_array_equal(unstacked["model"]["layers"]["1"]["self_attn"]["o_proj"]["kernel"],
                                  flat["model"]["layers"]["1"]["self_attn"]["o_proj"]["kernel"])
    assert hf_module_name("model.layers.self_attn.q_proj", 1) == "model.layers.1.self_attn.q_proj"
    assert hf_module_name("transformer.h.mlp.c_fc", 0) == "transformer.h.0.mlp.c_fc"
    assert hf_module_name("lm_head") == "lm_head"
    with pytest.raises(ValueError, match="pass layer_index"):
        hf_module_name("model.layers.self_attn.q_proj")


def test_from_hf_config_reads_flags():
    q2 = ModelConfig.from_hf(transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert q2.attention_bias and not q2.o_bias and not q2.qk_norm and q2.sliding_window is None
    q3 = ModelConfig.from_hf(transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert q3.qk_norm and q3.head_dim == 128
    m = ModelConfig.from_hf(transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert m.sliding_window == 4096 and m.sliding_layers == (True,) * m.num_layers
    cfg = json.loads(transformers.LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}).to_json_string())
    assert ModelConfig.from_hf(transformers.LlamaConfig(**cfg)).rope["factor"] == 2.0


def test_gpt2_without_transformer_prefix_and_unused_tensor_warning(tmp_path, tiny_checkpoint):
    """Original GPT-2 checkpoints name tensors 'h.0.attn.c_attn.weight' (no 'transformer.'); extras warn."""
    src = tiny_checkpoint("gpt2")[0]
    tensors = read_safetensors([os.path.join(src, "model.safetensors")])
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)  # an old causal-mask buffer: ignored
    renamed["extra.weight"] = np.ones(3, np.float32)
    _copy_with(src, tmp_path / "old", renamed)
    with pytest.warns(UserWarning, match=r"1 checkpoint tensors are not used by the model: extra.weight"):
        _, params, _ = from_pretrained(tmp_path / "old")
    _, ref, _ = loaded(src, False)
    np.testing.assert_array_equal(params["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"],
                                  ref["transformer"]["h"]["1"]["attn"]["c_attn"]["kernel"])
