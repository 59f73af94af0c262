"""Qwen3-MoE against transformers on a tiny random checkpoint: logits (unrolled and scanned), LoRA on
attention and on the stacked expert tensors with PEFT's `target_parameters` both ways (PeftModel
logits), targeting rules, generation, and gradients through the grouped matmuls. Expert
parallelism on 8 devices: tests/test_families_sharding.py."""

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
from lora_jax.models import from_pretrained, to_hf_state_dict
from lora_jax.models import moe
from lora_jax.models.moe import experts_forward
from parity import hf_base, hf_logits, our_logits, peft_logits, randomize_lora, torch_logits

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _qwen3_moe():
    import transformers as tf

    return tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                             rms_norm_eps=1e-5)


TINY_CONFIGS.update(qwen3_moe=_qwen3_moe)


@functools.lru_cache(maxsize=None)
def _loaded(path: str, scan: bool):
    model, params, _ = from_pretrained(path, scan_layers=scan)
    return model, params


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_logits_match_transformers(scan, tiny_checkpoint, padded_batch):
    path, torch_model = tiny_checkpoint("qwen3_moe")
    ids, mask = padded_batch
    model, params = _loaded(path, scan)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))[0])
    expected = torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(logits[real] - expected[real]).max() <= 1e-4
    assert np.abs(expected[real]).max() > 0.5


def test_checkpoint_round_trip_and_param_layout(tiny_checkpoint):
    path, torch_model = tiny_checkpoint("qwen3_moe")
    model, params = _loaded(path, False)
    mlp = params["model"]["layers"]["0"]["mlp"]
    assert mlp["gate"]["weight"].shape == (4, 32)  # the router: HF orientation, not a kernel
    assert mlp["experts"]["gate_up_proj"]["kernel"].shape == (4, 32, 32)  # [E, D, 2F]
    assert mlp["experts"]["down_proj"]["kernel"].shape == (4, 16, 32)  # [E, F, D]
    hf = {k: v.numpy() for k, v in torch_model.state_dict().items()}  # in memory: fused [E, 2F, D]
    np.testing.assert_array_equal(np.asarray(mlp["experts"]["gate_up_proj"]["kernel"]).transpose(0, 2, 1),
                                  hf["model.layers.0.mlp.experts.gate_up_proj"])
    from safetensors.numpy import load_file  # on disk: one tensor per expert; we write them back identically
    disk = load_file(f"{path}/model.safetensors")
    ours = to_hf_state_dict(params, model.cfg)
    assert set(ours) == set(disk)
    assert all(np.array_equal(ours[k], disk[k]) for k in disk)


def test_targeting_follows_peft(tiny_checkpoint):
    """target_parameters reaches the expert tensors; target_modules naming the pre-fusion (transformers v4)
    expert modules is rewritten as PEFT does (test below); the router, which PEFT's all-linear also adapts, is refused."""
    _, params = _loaded(tiny_checkpoint("qwen3_moe")[0], True)
    keys = lambda cfg: {".".join(p[:-1]) for p in lora_jax.targeting.select_targets(params, cfg)}  # noqa: E731
    for targets, message in (("all-linear", "all-linear' on a mixture of experts.*router"), (["gate", "q_proj"], "'gate', the MoE router"),
                             (["gate_proj", "q_proj"], "gate_proj without also targeting up_proj")):  # PEFT's message
        with pytest.raises(ValueError, match=message):
            keys(lora_jax.LoraConfig(target_modules=targets))
    with pytest.raises(ValueError, match="matched no kernel"):
        keys(lora_jax.LoraConfig(target_modules=["gate_up_proj"]))
    assert keys(lora_jax.LoraConfig(target_modules=None, target_parameters=["experts.down_proj"])) == {
        "model.layers.mlp.experts.down_proj"}
    with pytest.raises(ValueError, match="dropout"):
        lora_jax.LoraConfig(target_parameters=EXPERTS, dropout=0.1)


def test_peft_target_parameters_both_ways(tiny_checkpoint, tmp_path):
    import peft

    path, _ = tiny_checkpoint("qwen3_moe")
    base = hf_logits(hf_base(path))
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_base(path), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"],
                                                          target_parameters=EXPERTS, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "theirs")
    theirs = hf_logits(pm.eval())
    assert np.abs(theirs - base).max() > 1e-2
    for scan in (False, True):
        model, params = _loaded(path, scan)
        loaded, lcfg = load_peft_adapter(params, tmp_path / "theirs")
        assert lcfg.target_parameters == tuple(sorted(EXPERTS))
        np.testing.assert_allclose(our_logits(model.clone(lora=lcfg), loaded), theirs, atol=1e-4, rtol=0)

    model, params = _loaded(path, True)  # ours -> PEFT: only down_proj targeted (no base_layer nesting)
    lcfg = lora_jax.LoraConfig(r=3, alpha=5, target_modules=["v_proj"], target_parameters=["mlp.experts.down_proj"])
    adapted = randomize_lora(lora_jax.inject(params, lcfg, jax.random.key(0)), seed=2)
    assert adapted["model"]["layers"]["mlp"]["experts"]["down_proj"]["lora_a"].shape == (2, 4, 16, 3)
    ours = our_logits(model.clone(lora=lcfg), adapted)
    np.testing.assert_allclose(our_logits(model, lora_jax.merge(adapted)), ours, atol=1e-4, rtol=0)  # per-expert merge
    save_peft_adapter(adapted, lcfg, tmp_path / "ours", model_config=model.cfg)
    back = peft.PeftModel.from_pretrained(hf_base(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(hf_logits(back), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - base).max() > 1e-2


def test_v4_expert_module_names_are_rewritten_as_peft_does(tiny_checkpoint, tmp_path):
    # PEFT 0.21 with transformers >= 5: gate_proj + up_proj -> target_parameters gate_up_proj at rank and alpha x2,
    # down_proj -> down_proj (peft/utils/transformers_weight_conversion.py); before, lora_jax silently adapted q_proj only.
    import json

    import peft

    path, _ = tiny_checkpoint("qwen3_moe")
    targets = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(hf_base(path), peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets)).peft_config["default"]
    model, params = _loaded(path, True)
    lcfg = lora_jax.LoraConfig(r=2, alpha=6, target_modules=targets)
    adapted = randomize_lora(lora_jax.inject(params, lcfg, jax.random.key(0)), seed=3)
    gate_up = adapted["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]
    assert gate_up["lora_a"].shape[-1] == 4 and np.allclose(gate_up["lora_scale"], 3.0)  # 2r, (2 alpha) / (2r)
    ours = our_logits(model.clone(lora=lcfg), adapted)
    out = save_peft_adapter(adapted, lcfg, tmp_path / "a", model_config=model.cfg)
    written = json.load(open(f"{out}/adapter_config.json"))
    assert (set(written["target_modules"]), set(written["target_parameters"]), written["rank_pattern"], written["alpha_pattern"]) == (
        theirs.target_modules, theirs.target_parameters, theirs.rank_pattern, theirs.alpha_pattern)
    np.testing.assert_allclose(peft_logits(path, out), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - our_logits(model, params)).max() > 1e-2


def test_greedy_generation_matches_transformers(tiny_checkpoint):
    path, hf = tiny_checkpoint("qwen3_moe")
    ids = np.array([[0, 0, 5, 17, 33, 2], [11, 3, 60, 8, 21, 5]], np.int64)
    mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int64)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    model, params = _loaded(path, True)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=5)[:, 6:], out[:, 6:].numpy())


@pytest.mark.parametrize("impl", ["ragged", "tiled"])
def test_grouped_experts_equal_a_dense_reference_with_gradients(impl, monkeypatch):
    """Grouped experts (+ per-expert LoRA) == each token through its top-k experts' merged weights, values and grads,
    with jax.lax.ragged_dot and with the CPU tiled form."""
    monkeypatch.setattr(moe, "GROUPED", impl)
    rng = np.random.default_rng(0)
    n, k, e, d, f, r = 6, 2, 4, 8, 5, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    top_i = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    top_w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    p = lambda *s: jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32)  # noqa: E731
    gu = {"kernel": p(e, d, 2 * f), "lora_a": p(e, d, r), "lora_b": p(e, r, 2 * f), "lora_scale": jnp.full((e,), 1.5)}
    dn = {"kernel": p(e, f, d), "lora_a": p(e, f, r), "lora_b": p(e, r, d), "lora_scale": jnp.full((e,), 1.5)}

    def dense(x, gu, dn):  # every (token, chosen expert) pair with that expert's full merged weight
        w = lambda q: (q["kernel"] + jnp.einsum("eir,ero->eio", q["lora_a"], q["lora_b"])  # noqa: E731
                       * q["lora_scale"][:, None, None])[top_i]  # [n, k, in, out]
        g, u = jnp.split(jnp.einsum("ti,tkio->tko", x, w(gu)), 2, axis=-1)
        return jnp.einsum("tkf,tkfo,tk->to", jax.nn.silu(g) * u, w(dn), top_w)

    grouped = jax.jit(lambda x, gu, dn: experts_forward(x, top_w, top_i, gu, dn, "silu"))  # traced under the patch
    np.testing.assert_allclose(grouped(x, gu, dn), dense(x, gu, dn), atol=1e-5)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)  # noqa: E731
    g1, g2 = jax.grad(loss(grouped), argnums=(0, 1, 2))(x, gu, dn), jax.grad(loss(dense), argnums=(0, 1, 2))(x, gu, dn)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-4)
