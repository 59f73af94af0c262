"""Recipe schema: YAML + dotted overrides, validation, closest-key suggestions, --help. No model loads."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from train.cli import main as lora_jax_main
from train.config import Recipe, help_text, load_recipe, recipe_to_yaml, schema_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))))
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe) and r.to_lora_config().r >= 1


def test_shipped_recipes_exist():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))}
    assert {"smollm2_default.yaml", "hf_llama.yaml", "seeds_format.yaml"} <= names


def test_overrides_typed_and_frozen(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("lora: {r: 4}\noptim: {lr: 0.01}\n")
    r = load_recipe(y, ["lora.r=16", "optim.lr=1e-4", "data.packing=false", "sample_prompts=[a,b]",
                        "lora.target_modules=[q_proj,k_proj]", "mesh.fsdp=2"])
    assert (r.lora.r, r.optim.lr, r.data.packing, r.sample_prompts, r.mesh.fsdp) == (16, 1e-4, False, ["a", "b"], 2)
    assert r.to_lora_config().target_modules == ("k_proj", "q_proj")
    with pytest.raises(Exception):
        r.lora = None  # frozen
    assert load_recipe(None, ["lora.target_modules=all-linear"]).to_lora_config().target_modules == "all-linear"


def test_yaml_roundtrip(tmp_path):
    r = load_recipe(None, ["lora.rank_pattern={q_proj: 4}", "seed=3"])
    (tmp_path / "r.yaml").write_text(recipe_to_yaml(r))
    assert load_recipe(tmp_path / "r.yaml") == r


@pytest.mark.parametrize("override,suggestion", [
    ("lora.rr=3", "lora.r"), ("optim.lrr=1", "optim.lr"), ("lr=1e-4", "optim.lr"),
    ("batchsize=4", "batch_size"), ("data.max_len=64", "data.max_length"),
    # transformers / TRL names: learning_rate was "did you mean logging_steps", max_grad_norm "grad_accum"
    ("learning_rate=1e-4", "optim.lr"), ("max_grad_norm=1", "optim.grad_clip"), ("bf16=true", "precision"),
    ("dataset_name=x", "data.path"), ("gradient_checkpointing=true", "model.remat"),
])
def test_unknown_key_suggests_closest(override, suggestion):
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        load_recipe(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown recipe key 'optim.learning_rate' in .*r.yaml"):
        load_recipe(y)


@pytest.mark.parametrize("value,option", [("auto", "auto"), ("false", None), ("true", "full"), ("full", "full"),
                                          ("save_projections", "save_projections"), ("dots_saveable", "dots_saveable")])
def test_remat_accepts_bools_and_policies(value, option):
    assert load_recipe(None, [f"model.remat={value}"]).model.remat_option() == option


@pytest.mark.parametrize("override,message", [
    ("optim.lr=0", "optim.lr must be > 0"), ("optim.lr=-1", "optim.lr must be > 0"),
    ("batch_size=0", "batch_size must be >= 1"), ("grad_accum=3", "divisible by grad_accum"),
    ("lora.r=0", "lora.r must be an integer >= 1"), ("lora.dropout=1.5", "lora.dropout"),
    ("optim.schedule=step", "optim.schedule must be one of"), ("precision=fp8", "precision must be one of"),
    ("lora.r=abc", "'lora.r'"), ("data.max_length=2", "data.max_length must be >= 8"),
    ("data.metric=sql_exec", "needs data.metric_db"), ("data.template=Q: {question}", "{prompt}"),
    ("max_steps=-1", "max_steps must be >= 0"), ("mesh.data=0", "mesh.data"),
    ("optim.b1=1.0", "optim.b1"), ("save_total_limit=0", "save_total_limit"),
    ("model.remat=sometimes", "model.remat: remat='sometimes' is not a known policy"),
    ("model.attention=flash", "model.attention must be one of auto, reference, xla, cudnn, splash"),
])
def test_invalid_values(override, message):
    with pytest.raises(ValueError) as e:
        load_recipe(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_optional_text_field_can_be_unset_from_the_command_line():
    r = load_recipe(os.path.join(ROOT, "recipes", "smollm2_default.yaml"), ["data.eval_path=null", "data.name=~"])
    assert r.data.eval_path is None and r.data.name is None
    assert load_recipe(None, ["data.eval_path='null'"]).data.eval_path == "null"  # quoted: the text


@pytest.mark.parametrize("overrides,message", [
    (["data.metric=exact_match", "max_new_tokens=0"], "max_new_tokens=0 generates none"),
    (["sample_prompts=[hi]", "max_new_tokens=0"], "sample_prompts are answered only with max_new_tokens > 0"),
    (["data.metric=exact_match", "data.metric_examples=0"], "measures nothing"),
    (["optim.schedule=constant", "optim.min_lr_ratio=0.1"], "optim.schedule=constant has none"),
])
def test_settings_that_would_be_ignored_are_refused(overrides, message):
    with pytest.raises(ValueError) as e:
        load_recipe(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("lora: 8", "recipe section 'lora' in"), ("sample_prompts: hello", "sample_prompts in"),
    ("lora: {rank_pattern: [1, 2]}", "lora.rank_pattern in"),  # was a TypeError traceback from OmegaConf's merge
    ("lora: {target_modules: 5}", "lora.target_modules must be a module name list"),  # was "'int' object is not iterable"
])
def test_wrong_shapes_in_yaml_are_one_line(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ValueError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("lora: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_help_documents_every_field(capsys):
    assert lora_jax_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key, field in schema_keys().items():
        assert f"  {key} (" in out, key
        assert field.metadata.get("help"), f"{key} has no help"
    assert help_text() in out


@pytest.mark.parametrize("argv,fragment", [
    (["train", "recipes/smollm2_default.yaml", "lora.rr=3"], "did you mean 'lora.r'"),
    (["train", "recipes/smollm2_default.yaml", "optim.lr=0"], "optim.lr must be > 0"),
    (["train", "recipes/smollm2_default.yaml", "--frobnicate"], "unknown option"),
    (["train"], "no recipe given"),
])
def test_cli_one_line_errors(argv, fragment, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lora_jax_main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1



def test_bf16_precision_means_bf16_frozen_weights_and_attention_option_passes_through():
    r = load_recipe(None, ["precision=bf16", "model.attention=xla"])
    assert r.dtypes() == ("bfloat16", "bfloat16") and r.model.attention == "xla"
    assert load_recipe(None, ["precision=bf16", "model.dtype=float32"]).dtypes() == ("bfloat16", "float32")
    assert load_recipe(None, []).dtypes() == ("float32", "float32")


@pytest.mark.parametrize("schedule,hf_name,total,warmup", [
    ("cosine", "cosine", 10, {"warmup_ratio": 0.1}),     # 1 warmup step
    ("linear", "linear", 10, {"warmup_ratio": 0.04}),    # ceil(0.4) = 1 (round() would skip the warmup)
    ("constant", "constant_with_warmup", 6, {"warmup_steps": 2}),
    ("cosine", "cosine", 4, {"warmup_steps": 6}),        # a warmup longer than the run is honoured, not cut
])
def test_schedule_matches_transformers_step_by_step(schedule, hf_name, total, warmup):
    import torch
    import transformers

    from train.config import OptimSection
    from train.runtime import make_schedule

    optim = OptimSection(lr=1e-3, schedule=schedule, **warmup)
    ours = make_schedule(optim, total)
    args = transformers.TrainingArguments(output_dir="unused", warmup_steps=optim.warmup_steps or optim.warmup_ratio)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    hf = transformers.get_scheduler(hf_name, opt, num_warmup_steps=args.get_warmup_steps(total), num_training_steps=total)
    want = []
    for _ in range(total):
        want.append(hf.get_last_lr()[0])
        opt.step()
        hf.step()
    np.testing.assert_allclose([float(ours(s)) for s in range(total)], want, rtol=1e-6, atol=1e-12)
