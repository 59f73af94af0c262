"""GPT-2 (Conv1D, learned positions, LayerNorm, tied head) against transformers, plus its cache."""

import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models import init_cache
from parity import assert_parity, assert_remat_grads_equal, loaded


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_gpt2_logits_match_transformers(scan, tiny_checkpoint, padded_batch):
    assert_parity("gpt2", scan, tiny_checkpoint, padded_batch)


def test_gpt2_param_tree(tiny_checkpoint):
    path, torch_model = tiny_checkpoint("gpt2")
    _, params, _ = loaded(path, False)
    t = params["transformer"]
    assert "lm_head" not in params
    assert t["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (64, 192)  # Conv1D weight [in, out], untransposed
    assert t["h"]["1"]["mlp"]["c_fc"]["kernel"].shape == (64, 256)
    assert t["wpe"]["embedding"].shape == (64, 64) and t["ln_f"]["bias"].shape == (64,)
    np.testing.assert_array_equal(np.asarray(t["h"]["0"]["attn"]["c_attn"]["kernel"]),
                                  torch_model.transformer.h[0].attn.c_attn.weight.detach().numpy())


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_gpt2_incremental_decoding(scan, tiny_checkpoint, padded_batch):
    model, params, apply = loaded(tiny_checkpoint("gpt2")[0], scan)
    ids, mask = map(jnp.asarray, padded_batch)
    full, _ = apply({"params": params}, ids, mask)
    cache = init_cache(model.cfg, batch=2, max_len=8)
    out, cache = apply({"params": params}, ids[:, :6], mask[:, :6], cache=cache)
    outs = [out]
    for t in (6, 7):
        out, cache = apply({"params": params}, ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
        outs.append(out)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.concatenate(outs, 1)[real], np.asarray(full)[real], atol=1e-4, rtol=0)


def test_gpt2_remat_save_projections_gradients_equal_no_remat(tiny_checkpoint, padded_batch):
    assert_remat_grads_equal("gpt2", "save_projections", tiny_checkpoint, padded_batch)


def test_gpt2_refuses_more_tokens_than_learned_positions(tiny_checkpoint):
    model, params, _ = loaded(tiny_checkpoint("gpt2")[0], False)
    n = model.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=f"GPT-2 has {n} learned positions, got a sequence of {n + 1} tokens"):
        model.apply({"params": params}, jnp.zeros((1, n + 1), jnp.int32))
