"""`lora-jax train` end to end on a tiny random Llama: bad input (one line, exit 2, nothing written),
a full run's outputs, resume rules, export from checkpoint adapters, NaN and divergence stops,
SIGTERM and an early Ctrl-C in a subprocess."""

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
    (["data.eval_path=null", "data.eval_fraction=0", "data.metric=exact_match"], "data.metric=exact_match is measured on eval examples, and there are none"),
    (["data.eval_path=null", "data.eval_fraction=0", "eval_steps=5"], "eval_steps=5 measures the eval loss, and there are no eval examples"),
    (["model.attention=cudnn"], "attention='cudnn' cannot serve this call"),  # was found at the first eval, output_dir made
])
def test_bad_input_one_line_nothing_written(tiny, tmp_path, capsys, extra, fragment):
    out = tmp_path / "run"
    rc, _, err = run_cli(args(tiny, out, *extra), capsys)
    assert rc == 2 and fragment in err and err.count("\n") == 1, err
    assert not out.exists()


def test_bad_rows_and_broken_model_files_one_line_nothing_written(tiny, tmp_path, capsys):
    import shutil

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": null}\n')
    bad_sql = tmp_path / "bad.sql"
    bad_sql.write_text("CREATE TABLE oops (")  # was a traceback during the 'before' metric, output_dir half-made
    few = tmp_path / "few.jsonl"
    few.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    broken = {}
    for name in ("truncated", "noweights", "arch", "badjson"):
        broken[name] = tmp_path / name
        shutil.copytree(tiny, broken[name])
    st = broken["truncated"] / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    os.remove(broken["noweights"] / "model.safetensors")
    for f in os.listdir(broken["arch"]):
        if f != "config.json":  # no tokenizer either: the architecture must be named first
            os.remove(broken["arch"] / f)
    cfg = json.loads((broken["arch"] / "config.json").read_text())
    (broken["arch"] / "config.json").write_text(json.dumps(dict(cfg, model_type="frobnet", architectures=["FrobForCausalLM"])))
    (broken["badjson"] / "config.json").write_text('{"model_type": "llama",')
    cases = [
        ([f"data.path={rows}"], f"{rows} row 2: 'response' is null, not text; fix or drop that row"),
        ([f"data.path={few}"], "batch_size=4 is more than the 2 training rows (2 examples); lower batch_size"),
        (["data.metric=sql_exec", f"data.metric_db={bad_sql}"], "is not a script SQLite can run (incomplete input)"),
        ([f"model.path={broken['truncated']}"], f"{st} is not a readable .safetensors file"),
        ([f"model.path={broken['noweights']}"], "has config.json but no weights"),
        ([f"model.path={broken['arch']}"], "unsupported architecture model_type='frobnet'"),
        ([f"model.path={broken['badjson']}"], "config.json is not valid JSON (line 1"),
    ]
    for extra, fragment in cases:
        out = tmp_path / "run"
        rc, _, err = run_cli(args(tiny, out, *extra), capsys)
        assert rc == 2 and fragment in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
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

    # every save wrote that step's PEFT adapter: export reads it, and it is the final adapter at step 4
    for step in ("2", "4"):
        assert (out / "checkpoints" / step / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints/4/adapter/adapter_model.safetensors").read_bytes() == (out / "adapter/adapter_model.safetensors").read_bytes()

    # the same run again: needs --resume (nothing to do: already finished) or --overwrite
    rc, _, err = run_cli(args(tiny, out, *extra), capsys)
    assert rc == 2 and "--resume" in err
    results = (out / "results.json").read_bytes()
    rc, stdout, err = run_cli(args(tiny, out, *extra, "--resume"), capsys)
    assert rc == 0 and "already finished at step 4" in stdout and (out / "results.json").read_bytes() == results
    # a resume that would change the trajectory is refused, naming the fields; nothing changes
    rc, _, err = run_cli(args(tiny, out, *extra, "optim.lr=1e-3", "batch_size=8", "--resume"), capsys)
    assert rc == 2 and "would change the training trajectory (batch_size: 4 -> 8, optim.lr: 0.01 -> 0.001)" in err, err
    assert (out / "results.json").read_bytes() == results and "resumes" not in json.loads((out / "run.json").read_text())
    # an incompatible run: another LoRA config / another model
    rc, _, err = run_cli(args(tiny, out, "lora.r=8"), capsys)
    assert rc == 2 and "another LoRA config (lora r: 4 -> 8)" in err and err.count("\n") == 1, err
    rc, _, err = run_cli(args(tiny, out, "model.path=default", "--resume"), capsys)
    assert rc == 2 and "another model" in err
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]  # untouched
    # --overwrite starts over with the new config
    rc, _, err = run_cli(args(tiny, out, "lora.r=8", "max_steps=1", "--overwrite"), capsys)
    assert rc == 0, err
    # export of a run that lost its final adapter reads the newest checkpoint's adapter
    os.rename(out / "adapter", tmp_path / "final")
    rc, stdout, err = run_cli(["export", "--base", tiny, "--adapter", str(out), "--format", "peft", "--out", str(tmp_path / "x")], capsys)
    assert rc == 0 and "(checkpoint step 1)" in stdout, err
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() == (tmp_path / "final/adapter_model.safetensors").read_bytes()
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


def test_divergence_stops_nonzero_keeping_last_good_checkpoint(tiny, tmp_path, capsys):
    """optim.lr=1e6: the loss sits at ln(vocab) with a zero gradient norm (a destroyed adapter)."""
    out = tmp_path / "run"
    rc, _, err = run_cli(args(tiny, out, "optim.lr=1e6", "save_steps=1", "max_steps=12", "data.max_eval_examples=0",
                              "max_new_tokens=0", "divergence.patience=3"), capsys)
    assert rc == 1 and "training stopped at step" in err and "(collapsed) for 3 steps (divergence.grad_collapse)" in err, err
    step = int(err.split("at step ")[1].split(";")[0])
    kept = sorted(int(s) for s in os.listdir(out / "checkpoints"))
    assert step < 12 and kept[-1] == step - 3 and f"last good checkpoint: step {kept[-1]}" in err, (err, kept)
    assert not (out / "adapter").exists() and not (out / "results.json").exists()


def _started(path) -> bool:
    return path.is_file() and path.read_text().count("\n") >= 1


@pytest.mark.slow
def test_sigterm_saves_and_exits_143_then_resume_extends(tiny, tmp_path):
    """SIGTERM mid-run (how schedulers preempt): checkpoint + adapter saved, exit 143; a resume with a
    longer max_steps (allowed: constant schedule, warmup in steps) finishes, recording the change."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train"] + args(tiny, out, "max_steps=400", "save_steps=0", "max_new_tokens=0",
                                                 "optim.schedule=constant", "optim.warmup_ratio=0", "data.max_eval_examples=4")
    env = dict(os.environ, LORA_JAX_NO_REEXEC="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not _started(out / "metrics.jsonl"):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 143, log
    assert "SIGTERM: stopped at step" in log and "Traceback" not in log
    saved = int(log.split("checkpoint saved at step ")[1].split(";")[0])
    assert os.listdir(out / "checkpoints") == [str(saved)] and (out / "checkpoints" / str(saved) / "adapter").is_dir()
    r = subprocess.run(cmd + [f"max_steps={saved + 1}", "--resume"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from step {saved}" in r.stdout and "recipe changes: max_steps" in r.stdout
    assert json.loads((out / "run.json").read_text())["resumes"][0] == {"step": saved, "changed": {"max_steps": [400, saved + 1]}}
    assert json.loads((out / "results.json").read_text())["steps"] == saved + 1


@pytest.mark.slow
def test_early_ctrl_c_is_honoured(tiny, tmp_path):
    """Ctrl-C 2 s in (imports / loading / compiling): not swallowed, exit 130, no traceback."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train"] + args(tiny, out, "max_steps=400", "max_new_tokens=0")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         env=dict(os.environ, LORA_JAX_NO_REEXEC="1"))
    time.sleep(2.0)
    p.send_signal(signal.SIGINT)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 130, log
    assert "SIGINT" in log and "Traceback" not in log and "Exception ignored" not in log, log
    assert not (out / "results.json").exists()


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

    # --eval-only: the run's adapter measures what results.json says after training; nothing in output_dir changes
    res = json.loads((out / "results.json").read_text())
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc, stdout, err = run_cli(args(tiny, out, "max_steps=3", "optim.lr=5e-2", "export_merged=true", "data.max_eval_examples=4",
                                   "max_new_tokens=0", "--eval-only"), capsys)
    assert rc == 0 and f"eval only, {out / 'adapter'}: eval loss {res['after']['eval_loss']:.4f}" in stdout, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files


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
