"""Which kernels a LoraConfig targets, the shapes inject gives them, and the errors for bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig
from lora_jax.targeting import KernelLayout


def tree(n_layers=2, d=8, ff=16, vocab=32):
    layer = lambda: {  # noqa: E731
        "self_attn": {name: {"kernel": jnp.zeros((d, d))} for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": {"kernel": jnp.zeros((d, ff))}, "down_proj": {"kernel": jnp.zeros((ff, d))}},
        "input_layernorm": {"scale": jnp.ones((d,))},
    }
    return {
        "model": {"embed_tokens": {"embedding": jnp.zeros((vocab, d))}, "layers": {str(i): layer() for i in range(n_layers)}},
        "lm_head": {"kernel": jnp.zeros((d, vocab))},
    }


def targets(config, params=None):
    return {".".join(p[:-1]) for p in lora_jax.select_targets(tree() if params is None else params, config)}


def test_names_match_key_suffixes():
    assert targets(LoraConfig(target_modules=["q_proj", "v_proj"])) == {
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    }
    # a dotted suffix narrows to one layer, as in PEFT
    assert targets(LoraConfig(target_modules=["0.self_attn.q_proj"])) == {"model.layers.0.self_attn.q_proj"}


def test_regex_is_full_matched():
    assert targets(LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj")) == {
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    with pytest.raises(ValueError, match="matched no kernel"):
        targets(LoraConfig(target_modules="q_proj"))  # a regex is full-matched, not searched


def test_all_linear_skips_lm_head_and_embeddings():
    got = targets(LoraConfig(target_modules="all-linear"))
    assert len(got) == 2 * 6 and "lm_head" not in got and not any("embed" in k for k in got)


def test_exclude_modules():
    got = targets(LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.0.self_attn.q_proj"]))
    assert "model.layers.0.self_attn.q_proj" not in got and "model.layers.1.self_attn.q_proj" in got
    assert not any(k.endswith("down_proj") for k in got) and len(got) == 12 - 2 - 1
    got = targets(LoraConfig(target_modules="all-linear", exclude_modules=r".*mlp.*"))
    assert got == {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


def test_rank_pattern_sets_shapes_and_alpha_pattern_the_scale():
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "gate_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2, "gate_proj": 3},
                     alpha_pattern={"gate_proj": 6})
    p = lora_jax.inject(tree(), cfg, jax.random.key(0))
    layers = p["model"]["layers"]
    assert layers["0"]["self_attn"]["q_proj"]["lora_a"].shape == (8, 4)
    assert layers["1"]["self_attn"]["q_proj"]["lora_a"].shape == (8, 2)
    assert layers["1"]["self_attn"]["q_proj"]["lora_b"].shape == (2, 8)
    assert layers["0"]["mlp"]["gate_proj"]["lora_a"].shape == (8, 3)
    assert layers["0"]["mlp"]["gate_proj"]["lora_b"].shape == (3, 16)
    assert cfg.scale_for("model.layers.0.mlp.gate_proj", 3) == 2.0
    assert "lora_a" not in layers["0"]["self_attn"]["k_proj"]


def test_stacked_and_dense_general_layouts():
    p = {"layers": {"q_proj": {"kernel": jnp.zeros((3, 8, 16))}}, "o": {"kernel": jnp.zeros((2, 4, 8))}}
    out = lora_jax.inject(p, LoraConfig(r=2, target_modules=["q_proj", "o"]), jax.random.key(0),
                          layouts={"o": KernelLayout(stack=0, n_in=2), "layers.q_proj": KernelLayout(stack=1, n_in=1)})
    assert out["layers"]["q_proj"]["lora_a"].shape == (3, 8, 2)  # stacked: leading layer axis kept
    assert out["layers"]["q_proj"]["lora_b"].shape == (3, 2, 16)
    assert out["o"]["lora_a"].shape == (8, 2) and out["o"]["lora_b"].shape == (2, 8)  # in axes (2, 4) flattened
    # A kernel of 3+ axes outside the project's layer containers is never guessed.
    with pytest.raises(ValueError, match=r"kernel 'o' has shape \(2, 4, 8\).*pass layouts=lora_jax.kernel_layouts"):
        lora_jax.inject(p, LoraConfig(r=2, target_modules=["o"]), jax.random.key(0))


def test_init_matches_peft_distributions():
    p = {"q": {"kernel": jnp.zeros((400, 300))}}
    a = lora_jax.inject(p, LoraConfig(r=64, target_modules=["q"]), jax.random.key(0))["q"]["lora_a"]
    bound = 1 / 400**0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in]
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.95 * bound
    g = lora_jax.inject(p, LoraConfig(r=64, target_modules=["q"], init="gaussian"), jax.random.key(0))["q"]
    assert abs(float(g["lora_a"].std()) - 1 / 64) < 0.1 / 64
    assert a.dtype == jnp.float32 and not g["lora_b"].any()


def test_init_lora_weights_false_draws_b_as_peft():
    import peft
    import torch

    torch.manual_seed(0)
    theirs = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(400, 300)),
                                 peft.LoraConfig(r=16, target_modules=["0"], init_lora_weights=False))
    tb = theirs.base_model.model[0].lora_B["default"].weight.detach().numpy()  # [out, r]: U(±1/sqrt(r))
    p = {"q": {"kernel": jnp.zeros((400, 300))}}
    ours = lora_jax.inject(p, LoraConfig(r=16, target_modules=["q"], init_lora_weights=False), jax.random.key(0))["q"]
    b, bound = np.asarray(ours["lora_b"]), 1 / 16**0.5
    assert abs(np.abs(tb).max() - bound) < 0.01 * bound and abs(np.abs(b).max() - bound) < 0.01 * bound
    assert abs(b.std() - tb.std()) < 0.03 * tb.std() and np.abs(b).max() <= bound
    assert float(jnp.abs(ours["lora_a"]).max()) <= 1 / 400**0.5  # A: as the default init
    # Stacked layers of different ranks (padded): each layer's bound is its own rank's, padded slots stay 0.
    stacked = {"model": {"layers": {"mlp": {"up_proj": {"kernel": jnp.zeros((2, 64, 64))}}}}}
    cfg = LoraConfig(r=16, target_modules=["up_proj"], rank_pattern={"layers.1.mlp.up_proj": 4}, init_lora_weights=False)
    node = lora_jax.inject(stacked, cfg, jax.random.key(0))["model"]["layers"]["mlp"]["up_proj"]
    b = np.asarray(node["lora_b"])
    assert node["lora_rank"].tolist() == [16, 4] and not b[1, 4:].any() and not np.asarray(node["lora_a"])[1, :, 4:].any()
    assert 0.95 / 4 < np.abs(b[0]).max() <= 1 / 4 and 0.9 / 2 < np.abs(b[1, :4]).max() <= 1 / 2


def test_orthogonal_init_as_peft():
    import peft
    import torch

    torch.manual_seed(0)
    theirs = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(200, 300)),
                                 peft.LoraConfig(r=16, target_modules=["0"], init_lora_weights="orthogonal"))
    ta, tb = (theirs.base_model.model[0].lora_A["default"].weight.detach().numpy(),
              theirs.base_model.model[0].lora_B["default"].weight.detach().numpy())
    cfg = LoraConfig(r=16, target_modules=["q"], init_lora_weights="orthogonal")
    ours = lora_jax.inject({"q": {"kernel": jnp.zeros((200, 300))}}, cfg, jax.random.key(0))["q"]
    a, b = np.asarray(ours["lora_a"]), np.asarray(ours["lora_b"])
    assert np.abs(a @ b).max() < 1e-6 and np.abs(tb @ ta).max() < 1e-6  # nonzero A and B, zero product
    assert abs(a.std() / ta.std() - 1) < 0.1 and abs(b.std() / tb.std() - 1) < 0.1
    assert cfg.to_peft_dict()["init_lora_weights"] == "orthogonal" and LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg
    with pytest.raises(ValueError, match="Orthogonal initialization requires the LoRA rank to be even, got 7"):  # PEFT's message
        lora_jax.inject({"q": {"kernel": jnp.zeros((8, 8))}}, LoraConfig(r=7, target_modules=["q"], init="orthogonal"), jax.random.key(0))


def test_lora_leaves_are_fp32_over_a_bf16_base():
    p = {"q": {"kernel": jnp.zeros((8, 8), jnp.bfloat16)}}
    out = lora_jax.inject(p, LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))
    assert out["q"]["lora_a"].dtype == jnp.float32 and out["q"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "config, message",
    [
        (LoraConfig(target_modules=["c_attn"]), r"matched no kernel; modules with kernels are: lm_head, model\.layers\.0"),
        (LoraConfig(target_modules=["embed_tokens"]), "matches the embedding 'model.embed_tokens': LoRA on embeddings .PEFT's lora.Embedding. is not supported"),
        (LoraConfig(target_modules=["input_layernorm"]), "not a dense kernel"),
        (LoraConfig(target_modules=r"model\.layers\.0\..*"), "not a dense kernel"),
    ],
)
def test_bad_targets_name_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        lora_jax.inject(tree(), config, jax.random.key(0))


def test_a_tied_lm_head_named_as_a_target_is_refused_not_skipped():
    # PEFT adapts a tied lm_head (a Linear sharing the embedding); before, lora_jax silently adapted q_proj only.
    tied = {k: v for k, v in tree().items() if k != "lm_head"}
    for tm in (["q_proj", "lm_head"], r".*(q_proj|lm_head)"):
        with pytest.raises(ValueError, match="names 'lm_head', which this model ties to the embedding"):
            lora_jax.inject(tied, LoraConfig(target_modules=tm), jax.random.key(0))
    assert len(targets(LoraConfig(target_modules=["q_proj", "lm_head"], exclude_modules=["lm_head"]), tied)) == 2


def test_injecting_twice_is_refused():
    cfg = LoraConfig(target_modules=["q_proj"])
    p = lora_jax.inject(tree(), cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="already hold LoRA leaves"):
        lora_jax.inject(p, cfg, jax.random.key(0))
