"""PEFT's semantics, checked against PEFT's own code: matching, patterns, config names, defaults,
per-layer patterns under scan (export to / import from PeftModel with nonzero adapters)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

import lora_jax
from lora_jax import LoraConfig
from lora_jax.config import pattern_value
from lora_jax.targeting import DEFAULT_TARGET_MODULES, is_target

KEYS = [f"model.layers.{i}.{m}" for i in (0, 1, 2, 11) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj",
    "mlp.experts.0.up_proj", "mlp.experts.3.down_proj")] + [
    f"transformer.h.{i}.{m}" for i in (0, 1, 10) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + [
    "lm_head", "model.embed_tokens", "q_proj", "encoder.block.1.layer.0.SelfAttention.q", "decoder.layers.2.fc1"]

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj", "c_attn", "q"]),
    dict(target_modules=r".*\.(q_proj|c_fc)"),
    dict(target_modules=r"model\.layers\.1\..*proj"),
    dict(target_modules=["q_proj", "up_proj"], exclude_modules=["experts.0.up_proj"]),
    dict(target_modules=["up_proj", "c_proj"], exclude_modules=r".*layers\.(0|2)\..*"),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=0),
    dict(target_modules=["q_proj", "c_attn", "up_proj"], layers_to_transform=[1, 2, 10]),
    dict(target_modules=["q_proj", "c_attn", "up_proj"], layers_to_transform=[0, 1], layers_pattern="h"),
    dict(target_modules=["up_proj", "down_proj"], layers_to_transform=[0, 3], layers_pattern=["layers", "experts"]),
    dict(target_modules=["fc1", "q"], layers_to_transform=1),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=range(len(CONFIGS)))
def test_matching_agrees_with_peft_on_every_key(kwargs):
    ours, theirs = LoraConfig(**kwargs), peft.LoraConfig(**kwargs)
    for key in KEYS:
        expected = bool(check_target_module_exists(theirs, key))
        assert is_target(ours, key) == expected, (key, kwargs, expected)


def test_pattern_lookup_agrees_with_peft():
    patterns = {"layers.1.self_attn.q_proj": 2, r"model\.layers\.\d+\.mlp\..*": 3, "v_proj": 5, "c_attn": 6}
    for key in KEYS:
        hit = get_pattern_key(list(patterns), key)
        assert pattern_value(patterns, key, None) == patterns.get(hit), key


def test_peft_field_names_and_spellings():
    kwargs = dict(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj"], init_lora_weights="gaussian",
                  use_rslora=True, layers_to_transform=[0], layers_pattern="layers", task_type="CAUSAL_LM", bias="none")
    ours, theirs = LoraConfig(**kwargs), peft.LoraConfig(**kwargs)
    d = ours.to_peft_dict()
    for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "layers_to_transform", "layers_pattern"):
        assert d[k] == getattr(theirs, k), k
    assert (ours.alpha, ours.dropout, ours.init, ours.lora_alpha) == (16, 0.1, "gaussian", 16)
    assert LoraConfig.from_peft_dict(theirs.to_dict()) == ours
    for spelling in ("ALL-LINEAR", "All-Linear", "all-linear"):
        assert LoraConfig(target_modules=spelling).target_modules == lora_jax.ALL_LINEAR
    assert LoraConfig(use_dora=True).to_peft_dict()["use_dora"] is True  # DoRA: lora_jax.variants.dora
    with pytest.raises(ValueError, match="bias='all'.*not supported"):
        LoraConfig(bias="all")
    with pytest.raises(ValueError, match="cannot be used when target_modules is a str"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lora_rank'"):
        LoraConfig(lora_rank=4)


def _gpt2_tree(d=8):
    layer = {"attn": {"c_attn": {"kernel": jnp.zeros((d, 3 * d))}, "c_proj": {"kernel": jnp.zeros((d, d))}},
             "mlp": {"c_fc": {"kernel": jnp.zeros((d, 4 * d))}, "c_proj": {"kernel": jnp.zeros((4 * d, d))}}}
    return {"transformer": {"h": {"0": layer}, "wte": {"embedding": jnp.zeros((16, d))}}}


def test_default_target_modules_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as theirs

    assert DEFAULT_TARGET_MODULES == theirs
    assert LoraConfig().target_modules is None  # PEFT's default: decided by the architecture
    got = lora_jax.select_targets(_gpt2_tree(), LoraConfig())
    assert got == [("transformer", "h", "0", "attn", "c_attn", "kernel")]  # GPT-2 -> c_attn, as PEFT
    with pytest.raises(ValueError, match="PEFT has no default for model_type None"):
        lora_jax.inject({"dense": {"kernel": jnp.zeros((2, 2))}}, LoraConfig(), jax.random.key(0))


def test_regex_naming_a_module_without_kernel_raises_like_peft():
    import transformers as tf

    hf = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                            num_key_value_heads=1, vocab_size=32))
    params = {"model": {"layers": {"self_attn": {m: {"kernel": jnp.zeros((1, 16, 16))} for m in ("q_proj", "v_proj")},
                                   "input_layernorm": {"scale": jnp.ones((1, 16))}}}}
    for target in (".*self_attn.*", ["self_attn"], ["input_layernorm"], r"model\.layers\.0"):
        with pytest.raises(ValueError, match="is not support"):
            peft.get_peft_model(hf, peft.LoraConfig(target_modules=target))
        with pytest.raises(ValueError, match="which is not a dense kernel"):
            lora_jax.inject(params, LoraConfig(target_modules=target), jax.random.key(0))


class Classifier(nn.Module):  # a plain linen model whose output layer is not called lm_head
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="fc1")(x))
        h = nn.relu(nn.Dense(16, name="fc2")(h))
        return nn.Dense(3, name="classifier")(h).astype(jnp.float32)


def test_all_linear_leaves_out_the_output_layer_whatever_its_name():
    x = jnp.ones((2, 8))
    model = Classifier()
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lora_jax.kernel_layouts(model, x)
    assert layouts.output_module == "classifier"
    got = lora_jax.select_targets(params, LoraConfig(target_modules="all-linear"), layouts)
    assert sorted(p[0] for p in got) == ["fc1", "fc2"]
    with pytest.raises(ValueError, match="all-linear.*pass layouts=lora_jax.kernel_layouts"):
        lora_jax.inject(params, LoraConfig(target_modules="all-linear"), jax.random.key(0))


def test_swapped_in_adapter_brings_its_scale_and_merge_needs_no_config():
    x = jnp.ones((2, 8))
    model = Classifier()
    params = model.init(jax.random.key(0), x)["params"]
    layouts = lora_jax.kernel_layouts(model, x)
    model_cfg = LoraConfig(r=2, alpha=2, target_modules=["fc1"])
    other_cfg = LoraConfig(r=4, alpha=32, target_modules=["fc1"])  # scale 8, not the model config's 1
    other = lora_jax.inject(params, other_cfg, jax.random.key(1), layouts=layouts)
    other["fc1"]["lora_b"] = jax.random.normal(jax.random.key(2), other["fc1"]["lora_b"].shape)
    other_lora, frozen = lora_jax.split(other)
    swapped = lora_jax.combine(other_lora, frozen)
    y = lora_jax.apply(model.apply, model_cfg)({"params": swapped}, x)
    merged = lora_jax.merge(swapped, None)
    assert np.allclose(y, model.apply({"params": merged}, x), atol=1e-5)
    a, b = other["fc1"]["lora_a"], other["fc1"]["lora_b"]
    expect = dict(frozen, fc1=dict(frozen["fc1"], kernel=frozen["fc1"]["kernel"] + 8.0 * a @ b))
    assert np.allclose(y, model.apply({"params": expect}, x), atol=1e-5)


# ---- per-layer patterns on scanned (stacked) layers, against PeftModel ---------------------------

PER_LAYER = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={r"model\.layers\.0\.mlp\.down_proj": 3},
                       exclude_modules=["model.layers.0.self_attn.v_proj"])
LAYER_0 = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], layers_to_transform=0, layers_pattern="layers")


@pytest.mark.parametrize("lcfg", [PER_LAYER, LAYER_0], ids=["patterns", "layers_to_transform=0"])
def test_scanned_per_layer_patterns_match_peft(lcfg, tiny_checkpoint, tmp_path):
    from test_peft_export import our_logits, ours, peft_logits

    path, _ = tiny_checkpoint("llama")
    model, base, params = ours(path, lcfg, scan_layers=True)
    params = lora_jax.transform.zero_padded_slots(params)
    out = lora_jax.save_peft_adapter(params, lcfg, tmp_path / "a", model_config=model.cfg, base_model_name_or_path=path)
    # PEFT's own get_peft_model on the HF model adapts exactly the modules (and ranks) we wrote.
    import transformers as tf

    hf = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(path), peft.LoraConfig(**{
        k: v for k, v in lcfg.to_peft_dict().items() if k != "peft_type"}))
    theirs = {n: m.r["default"] for n, m in hf.base_model.model.named_modules() if hasattr(m, "lora_A")}
    from safetensors import safe_open

    with safe_open(os.path.join(out, "adapter_model.safetensors"), "numpy") as f:
        written = {k[len("base_model.model."):-len(".lora_A.weight")]: f.get_tensor(k).shape[0] for k in f.keys() if "lora_A" in k}
    assert written == theirs
    assert_close = lambda a, b, tol: np.testing.assert_allclose(a, b, atol=tol, rtol=0)  # noqa: E731
    mine = our_logits(model, params)
    assert_close(mine, peft_logits(path, out), 1e-4)
    back, back_cfg = lora_jax.load_peft_adapter(base, out)  # back into the stacked model: same leaves
    for (p1, x), (p2, y) in zip(jax.tree_util.tree_leaves_with_path(lora_jax.split(params)[0]),
                                jax.tree_util.tree_leaves_with_path(lora_jax.split(back)[0])):
        assert p1 == p2 and np.array_equal(np.asarray(x), np.asarray(y)), p1
    trainable, _ = lora_jax.count_parameters(params)
    assert trainable == sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)  # PEFT's count


def test_padded_rank_slots_never_move():
    p = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 8))}}}}}
    cfg = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 1})
    lora, frozen = lora_jax.split(lora_jax.inject(p, cfg, jax.random.key(0)))
    tx = lora_jax.optimizer(optax.adamw(0.1, weight_decay=0.5), lora)
    state = tx.init(lora)

    @jax.jit
    def step(lora, state):
        grads = jax.tree.map(jnp.ones_like, lora)  # even a gradient on the padded slots
        updates, state = tx.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state

    for _ in range(2):
        lora, state = step(lora, state)
    node = lora["model"]["layers"]["self_attn"]["q_proj"]
    assert float(jnp.abs(node["lora_a"][1, :, 1:]).max()) == 0 and float(jnp.abs(node["lora_b"][1, 1:]).max()) == 0
    assert float(jnp.abs(node["lora_b"][0]).min()) > 0 and float(jnp.abs(node["lora_b"][1, :1]).min()) > 0
    assert node["lora_rank"].tolist() == [4, 1]


def test_swapped_in_adapter_gives_peft_logits(tiny_checkpoint, tmp_path):
    from test_peft_export import our_logits, ours, peft_logits

    path, _ = tiny_checkpoint("llama")
    other = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])  # scale 8
    model, base, params = ours(path, other)
    other_lora, frozen = lora_jax.split(params)
    model = model.clone(lora=LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))  # the model's own: scale 1
    out = lora_jax.save_peft_adapter(other_lora, other, tmp_path / "a", model_config=model.cfg)
    np.testing.assert_allclose(our_logits(model, lora_jax.combine(other_lora, frozen)), peft_logits(path, out), atol=1e-4, rtol=0)
