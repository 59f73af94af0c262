"""`lora-jax train` end to end on a tiny random Llama: bad input (one line, exit 2, nothing written),
a full run's outputs, NaN stop, Ctrl-C save-and-exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from train.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "seeds_format.yaml")
TRAIN, EVAL, DB = (os.path.join(ROOT, "data", "sql", f) for f in ("train.jsonl", "eval.jsonl", "schema.sql"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from train.testing import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")))


def args(tiny, out, *extra):
    return ["train", RECIPE, f"model.path={tiny}", f"data.path={TRAIN}", f"data.eval_path={EVAL}", "data.max_length=64",
            "data.max_eval_examples=16", "batch_size=4", "max_steps=4", "logging_steps=1", "max_new_tokens=8",
            "lora.r=4", "lora.target_modules=all-linear", "data.metric=none", f"output_dir={out}", *extra]


def run_cli(argv, capsys):
    rc = cli(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("extra,fragment", [
    (["model.path=/nonexistent/model"], "model path '/nonexistent/model' not found"),
    (["data.path=/nonexistent/d.jsonl"], "dataset file '/nonexistent/d.jsonl' not found"),
    (["data.prompt_column=question"], "has no column 'question'"),
    (["data.max_length=8"], "every training example is longer than data.max_length=8"),
    (["data.template=chat"], "the tokenizer has no chat template"),
    (["data.eval_path=/nonexistent/e.csv"], "dataset file '/nonexistent/e.csv' not found"),
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["batch_size=0"], "batch_size must be >= 1"),
    (["lora.alpah=3"], "did you mean 'lora.alpha'"),
    (["data.metric=sql_exec", "data.metric_db=/nonexistent.sql"], "data.metric_db '/nonexistent.sql' not found"),
])
def test_bad_input_one_line_nothing_written(tiny, tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    rc, _, err = run_cli(args(tiny, out, *extra), capsys)
    assert rc == 2 and fragment in err and err.count("\n") == 1, err
    assert not out.exists()


def test_empty_dataset(tiny, tmp_path, capsys):
    (tmp_path / "e.jsonl").write_text("")
    rc, _, err = run_cli(args(tiny, tmp_path / "run", f"data.path={tmp_path / 'e.jsonl'}"), capsys)
    assert rc == 2 and "is empty" in err and not (tmp_path / "run").exists()


def test_full_run_then_output_dir_rules(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["optim.lr=1e-2", "data.metric=sql_exec", f"data.metric_db={DB}", "data.metric_examples=4", "eval_steps=2", "save_steps=2"]
    rc, stdout, err = run_cli(args(tiny, out, *extra), capsys)
    assert rc == 0, err
    for f in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "loss.png", "results.json",
              "metrics.jsonl", "recipe.yaml", "run.json"):
        assert (out / f).is_file(), f
    assert any(n.startswith("events.") for n in os.listdir(out / "tb"))
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
    res = json.loads((out / "results.json").read_text())
    assert res["after"]["eval_loss"] < res["before"]["eval_loss"]
    assert "<assistant> (before):" in stdout and "eval loss:" in stdout and "sql_exec:" in stdout
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"

    # the same run again: needs --resume (nothing to do: already finished) or --overwrite
    rc, _, err = run_cli(args(tiny, out, *extra), capsys)
    assert rc == 2 and "--resume" in err
    # an incompatible run: another LoRA config / another model
    rc, _, err = run_cli(args(tiny, out, "lora.r=8"), capsys)
    assert rc == 2 and "another LoRA config" in err and err.count("\n") == 1
    rc, _, err = run_cli(args(tiny, out, "model.path=default", "--resume"), capsys)
    assert rc == 2 and "another model" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]  # untouched
    # --overwrite starts over with the new config
    rc, _, err = run_cli(args(tiny, out, "lora.r=8", "max_steps=1", "--overwrite"), capsys)
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["lora"]["r"] == 8 and sorted(os.listdir(out / "checkpoints")) == ["1"]
    # a directory that is not a run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    rc, _, err = run_cli(args(tiny, tmp_path / "other"), capsys)
    assert rc == 2 and "holds no lora-jax run" in err


def test_nan_stops_naming_the_step_keeping_last_good(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_cli(args(tiny, out, "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_ratio=0", "save_steps=1", "max_steps=6",
                              "data.max_eval_examples=0", "max_new_tokens=0"), capsys)
    assert rc == 1 and "at step" in err and "last good checkpoint" in err, err
    step = int(err.split("at step ")[1].split(";")[0])
    kept = sorted(int(s) for s in os.listdir(out / "checkpoints"))
    assert kept and kept[-1] == step - 1 and not (out / "adapter").exists()


@pytest.mark.slow
def test_sigint_saves_and_exits_then_resumes(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train"] + args(tiny, out, "max_steps=400", "save_steps=0", "max_new_tokens=0")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not _steps_logged(out / "metrics.jsonl"):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 130, log
    assert "interrupted: checkpoint saved at step" in log and "Traceback" not in log
    saved = int(log.split("checkpoint saved at step ")[1].split(";")[0])
    assert os.listdir(out / "checkpoints") == [str(saved)]
    r = subprocess.run(cmd + ["max_steps=" + str(saved + 2), "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    # max_steps is part of the recipe, not the run identity: the resumed run finishes at saved + 2
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from step {saved}" in r.stdout and (out / "adapter" / "adapter_model.safetensors").is_file()


def _steps_logged(path) -> bool:
    return path.is_file() and path.read_text().count("\n") >= 2


def test_exported_adapter_and_merged_model_agree_in_transformers(tiny, tmp_path, capsys):
    """The PEFT adapter on the base model and the merged checkpoint give the same logits (torch)."""
    import numpy as np
    import torch
    import transformers
    from peft import PeftModel

    out = tmp_path / "run"
    rc, _, err = run_cli(args(tiny, out, "max_steps=3", "optim.lr=5e-2", "export_merged=true", "data.max_eval_examples=4", "max_new_tokens=0"), capsys)
    assert rc == 0, err
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    plain = base(ids).logits.detach().numpy()
    peft_logits = PeftModel.from_pretrained(base, str(out / "adapter")).eval()(ids).logits.detach().numpy()
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"))(ids).logits.detach().numpy()
    assert np.abs(peft_logits - plain).max() > 1e-4  # the adapter does something
    np.testing.assert_allclose(peft_logits, merged, atol=1e-4)


@pytest.mark.slow
def test_fsdp_mesh_on_two_host_devices(tiny, tmp_path):
    """The same program on a 2-device mesh (fsdp=2): frozen weights and LoRA sharded, batch split."""
    out = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", LORA_JAX_NO_REEXEC="1")
    cmd = [sys.executable, "-m", "train"] + args(tiny, out, "mesh.data=1", "mesh.fsdp=2", "max_steps=2", "max_new_tokens=0")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_shipped_hf_recipe_runs_bf16_with_save_projections_and_accumulation(tiny, tmp_path, capsys):
    """recipes/hf_llama.yaml as shipped (bf16 compute, remat=save_projections, grad_accum, dropout,
    merged export), shrunk to 2 steps; the tiny tokenizer has no chat template, so seeds format."""
    import json

    recipe = os.path.join(ROOT, "recipes", "hf_llama.yaml")
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", recipe, f"model.path={tiny}", "epochs=0", "max_steps=2", "batch_size=4",
                          "data.max_length=64", "data.template=seeds", "data.max_eval_examples=8",
                          "data.metric_examples=2", "max_new_tokens=4", "lora.r=4", f"output_dir={out}"], capsys)
    assert rc == 0, err
    recipe_used = (out / "recipe.yaml").read_text()
    assert "remat: save_projections" in recipe_used and "precision: bf16" in recipe_used and "grad_accum: 4" in recipe_used
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and all(0 < results[k]["eval_loss"] < 20 for k in ("before", "after"))
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "merged" / "config.json").exists()
