"""kill -9 at arbitrary moments, then --resume: the final adapter is bitwise the uninterrupted one.

A tiny random Llama trains for 10 steps on 24 examples (5 epochs, so the data order wraps),
with LoRA dropout (the per-step rng matters) and 2 micro-batches per step, checkpointing every
step. Run A goes straight through; run B is SIGKILLed twice — right after a checkpoint lands,
wherever the next step or save happens to be — and resumed each time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from train.testing import make_tiny_model

    d = tmp_path_factory.mktemp("resume")
    model = make_tiny_model(str(d / "tiny"))
    lines = open(os.path.join(ROOT, "data", "sql", "train.jsonl")).read().splitlines()
    (d / "small.jsonl").write_text("\n".join(lines[:24]) + "\n")
    return d, model


def command(d, model, out):
    return [sys.executable, "-m", "train", "train", os.path.join(ROOT, "recipes", "seeds_format.yaml"),
            f"model.path={model}", f"data.path={d / 'small.jsonl'}", "data.eval_fraction=0.2", "data.max_length=64",
            "data.metric=none", "lora.r=4", "lora.dropout=0.1", "lora.target_modules=all-linear", "optim.lr=3e-2",
            "batch_size=4", "grad_accum=2", "max_steps=10", "save_steps=1", "save_total_limit=2", "logging_steps=1",
            "max_new_tokens=0", f"output_dir={out}"]


def checkpoints(out) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if d.is_dir() else []


def run_and_kill_after(cmd, out, step: int) -> None:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not (checkpoints(out) and checkpoints(out)[-1] >= step):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.slow
def test_kill9_and_resume_is_bitwise_identical(setup):
    d, model = setup
    a, b = d / "a", d / "b"
    r = subprocess.run(command(d, model, a), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    run_and_kill_after(command(d, model, b), b, 3)
    assert not (b / "adapter").exists()
    run_and_kill_after(command(d, model, b) + ["--resume"], b, 7)
    r = subprocess.run(command(d, model, b) + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from step" in r.stdout

    adapter = "adapter/adapter_model.safetensors"
    assert (a / adapter).read_bytes() == (b / adapter).read_bytes()
    ra, rb = (json.loads((x / "results.json").read_text()) for x in (a, b))
    assert ra["after"]["eval_loss"] == rb["after"]["eval_loss"] and ra["before"] == rb["before"]
