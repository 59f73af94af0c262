"""`save_merged`: transformers loads the merged checkpoint with no missing/unexpected keys and its
logits match ours (unmerged LoRA) to 1e-4 in fp32 (measured 2.5e-6); bf16 / fp16 weights (run in
fp32) to 0.06 / 0.01 absolute on logits of magnitude ~4 (measured 0.028 / 0.0036): the rounding of
the weights, not a mapping error (those are O(1)).
Our own loader reads the checkpoint back to exactly the merged params; shards get an index."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import lora_jax
from lora_jax.interop import save_merged
from lora_jax.tree import filter_tree
from lora_jax.models import from_pretrained
from parity import assert_close, hf_logits, load_hf, our_logits, ours

TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"), "llama": ("q_proj", "v_proj", "down_proj", "lm_head"),
           "qwen2": ("q_proj", "k_proj", "o_proj", "up_proj")}




@pytest.fixture(scope="module")
def adapted(tiny_checkpoint):
    """arch -> (base dir, model, params with a random adapter, LoraConfig, our logits)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            path, _ = tiny_checkpoint(arch)
            lcfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=TARGETS[arch])
            model, _, params = ours(path, lcfg)
            cache[arch] = (path, model, params, lcfg, our_logits(model, params))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_merged_loads_in_transformers(arch, adapted, tmp_path):
    path, model, params, lcfg, mine = adapted(arch)
    hf = transformers.AutoConfig.from_pretrained(path)
    out = save_merged(params, lcfg, tmp_path / "m", hf_config=hf, tokenizer=path)
    extra = {"generation_config.json"} & set(os.listdir(path))  # copied from the base dir with any tokenizer files
    assert set(os.listdir(out)) == {"config.json", "model.safetensors"} | extra
    assert_close(hf_logits(load_hf(out)), mine)
    # Our loader reads back exactly the merged tree (fp32).
    _, back, _ = from_pretrained(out)
    merged = lora_jax.merge(params, lcfg)
    flat = dict(jax.tree_util.tree_leaves_with_path(merged))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(merged)
    for k, v in jax.tree_util.tree_leaves_with_path(back):
        assert np.array_equal(np.asarray(v), np.asarray(flat[k])), k


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("bfloat16", torch.bfloat16, 0.06), ("fp16", torch.float16, 0.01)])
def test_merged_half_precision(dtype, torch_dtype, tol, adapted, tmp_path):
    path, model, params, lcfg, mine = adapted("llama")
    out = save_merged(params, lcfg, tmp_path / "m", hf_config=transformers.AutoConfig.from_pretrained(path), dtype=dtype)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == {"fp16": "float16"}.get(dtype, dtype)
    hf = load_hf(out, dtype="auto")
    assert next(hf.parameters()).dtype == torch_dtype
    assert_close(hf_logits(hf.float()), mine, tol)


def test_sharded_with_index(adapted, tmp_path):
    path, model, params, lcfg, mine = adapted("qwen2")
    out = save_merged(params, lcfg, tmp_path / "m", hf_config=transformers.AutoConfig.from_pretrained(path), max_shard_size="100KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(f for f in os.listdir(out) if f.startswith("model-"))
    assert "lm_head.weight" not in index["weight_map"]  # tied: not written
    assert_close(hf_logits(load_hf(out)), mine)
    _, back, _ = from_pretrained(out)
    assert_close(our_logits(model.clone(lora=None), back), mine)


def test_merged_errors(adapted, tmp_path):
    path, model, params, lcfg, _ = adapted("llama")
    hf = transformers.AutoConfig.from_pretrained(path)
    unscaled = filter_tree(params, lambda p: p[-1] != "lora_scale")  # an adapter without its scale
    with pytest.raises(ValueError, match="no lora_scale leaf and no LoraConfig"):
        save_merged(unscaled, None, tmp_path / "a", hf_config=hf)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        save_merged(params, lcfg, tmp_path / "a", hf_config=hf, dtype="int8")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        save_merged(params, lcfg, tmp_path / "b", hf_config=hf)
    assert os.listdir(tmp_path / "b") == ["x"] and sorted(os.listdir(tmp_path)) == ["b"]
