"""LoraConfig: validation, per-module rank/alpha/scale, and the PEFT adapter_config round trip."""

import math

import peft
import pytest

from lora_jax import LoraConfig


def test_scale_is_alpha_over_r_and_rslora_over_sqrt_r():
    assert LoraConfig(r=8, alpha=16).scale_for("q_proj") == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale_for("q_proj") == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_patterns_match_like_peft():
    cfg = LoraConfig(r=8, alpha=16, rank_pattern={"layers.0.self_attn.q_proj": 4, "v_proj": 2}, alpha_pattern={"q_proj": 3})
    key0, key1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert cfg.rank_for(key0) == 4 and cfg.rank_for(key1) == 8
    assert cfg.rank_for("model.layers.3.self_attn.v_proj") == 2
    assert cfg.scale_for(key0) == pytest.approx(3 / 4) and cfg.scale_for(key1) == pytest.approx(3 / 8)
    # PEFT's own matcher agrees on which pattern applies.
    from peft.utils.other import get_pattern_key

    assert get_pattern_key(list(cfg.rank_pattern), key0) == "layers.0.self_attn.q_proj"
    assert get_pattern_key(list(cfg.rank_pattern), key1) == key1  # PEFT: no match -> key itself


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be an integer >= 1"),
        (dict(r=2.5), "r must be an integer >= 1"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(target_modules="q_proj("), "not a valid regex"),
        (dict(rank_pattern={"q": 0}), "must be a positive number"),
        (dict(alpha_pattern={"(": 2}), "not a valid regex"),
        (dict(init="xavier"), "init must be one of"),
        (dict(init="loftq"), "loftq_init\\(params, config, rng\\)"), (dict(init=False), "init_lora_weights=False is .random."),
        (dict(dtype="int8"), "dtype must be one of"),
    ],
)
def test_invalid_configs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_frozen_and_hashable():
    cfg = LoraConfig(rank_pattern={"q": 2})
    with pytest.raises(Exception):
        cfg.r = 3  # type: ignore[misc]
    assert hash(cfg) == hash(LoraConfig(rank_pattern={"q": 2}))


def test_peft_dict_round_trip_and_peft_accepts_it():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4}, use_rslora=True, init="gaussian")
    d = cfg.to_peft_dict()
    assert LoraConfig.from_peft_dict(d) == cfg
    theirs = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    assert theirs.r == 4 and theirs.lora_alpha == 8 and theirs.use_rslora
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}
    assert theirs.rank_pattern == {"q_proj": 2} and theirs.init_lora_weights == "gaussian"
    # ... and back from what PEFT writes to adapter_config.json.
    assert LoraConfig.from_peft_dict(theirs.to_dict()) == cfg


def test_every_peft_field_is_accepted_and_numpy_scalars_are_plain():
    import json

    import numpy as np

    theirs = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], use_rslora=True,
                             layers_to_transform=[0], layers_pattern="layers", task_type="CAUSAL_LM")
    d = json.loads(json.dumps(theirs.to_dict(), default=sorted))  # what adapter_config.json holds
    assert LoraConfig(**d) == LoraConfig.from_peft_dict(d)  # every PEFT key (peft_version, eva_config, ...) accepted
    from lora_jax.interop.peft_config import lora_config_from_peft

    d["runtime_config"] = {"ephemeral_gpu_offload": False}  # PEFT runtime-only; some saved configs carry it
    assert lora_config_from_peft(d) == LoraConfig.from_peft_dict(d)
    cfg = LoraConfig(r=np.int64(4), lora_alpha=np.float32(8), layers_to_transform=np.int64(1), target_modules=["q"])
    assert (type(cfg.r), type(cfg.alpha), type(cfg.layers_to_transform)) == (int, float, int)
    json.dumps(cfg.to_peft_dict())


def test_task_type_is_peft_s_and_head_training_tasks_are_refused():
    assert LoraConfig(task_type=peft.TaskType.CAUSAL_LM).r == 8
    with pytest.raises(ValueError, match="is not one of PEFT's task types"):
        LoraConfig(task_type="invalid-task-type")  # PEFT: "Invalid task type"
    with pytest.raises(ValueError, match=r"trains the task head \(modules_to_save=\['classifier', 'score'\]\)"):
        LoraConfig(task_type="SEQ_CLS")


def test_init_lora_weights_false_is_random_and_round_trips():
    cfg = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    assert cfg.init == "random" and cfg.init_lora_weights is False
    d = cfg.to_peft_dict()
    assert d["init_lora_weights"] is False and LoraConfig.from_peft_dict(d) == cfg
    assert peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"}).init_lora_weights is False


def test_peft_config_methods_round_trip_with_peft(tmp_path):
    ours = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2})
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.LoraConfig.from_pretrained(tmp_path / "ours")  # PEFT reads what we wrote
    assert (theirs.r, theirs.lora_alpha, set(theirs.target_modules), theirs.rank_pattern) == (4, 16, {"q_proj", "v_proj"}, {"v_proj": 2})
    peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False, task_type="CAUSAL_LM").save_pretrained(tmp_path / "theirs")
    assert LoraConfig.from_pretrained(tmp_path / "theirs") == LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False)
    assert set(ours.to_dict()) >= set(theirs.to_dict())
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        LoraConfig.from_pretrained(tmp_path / "none")
