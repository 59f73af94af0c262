"""`lora-jax train` as a 2-process job (2 x 4 CPU devices, gloo on localhost), killed with SIGKILL
mid-way and resumed: the final adapter is bitwise the one of an uninterrupted single-process run
on 8 devices with the same global batch; a checkpoint the 8-device job wrote exports on this
process's one CPU device.

The single process runs as a 1-process `jax.distributed` job (JAX_NUM_PROCESSES=1 with a
coordinator), so its cross-device sums use the same gloo collectives as the 2-process job: plain
in-process XLA sums in another order and differs in the last bits (measured: 5e-4 on sums of
1e3-scale values).

Kept small: a tiny random Llama, 8 steps, no eval and no generation (one compilation per run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from train.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def command(model, data, out):
    return [sys.executable, "-m", "train", "train", os.path.join(ROOT, "recipes", "seeds_format.yaml"),
            f"model.path={model}", f"data.path={data}", "data.eval_fraction=0", "eval_steps=0", "data.max_length=64",
            "data.max_eval_examples=0", "data.metric=none", "lora.r=4", "lora.target_modules=all-linear",
            "lora.dropout=0.1", "optim.lr=3e-2", "batch_size=8", f"max_steps={STEPS}", "save_steps=2",
            "save_total_limit=10", "logging_steps=1", "max_new_tokens=0", f"output_dir={out}"]


def env(devices: int, **extra) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                LORA_JAX_NO_REEXEC="1", **extra)


def job(cmd, logs):
    """Start the 2-process job; returns the Popen objects (process 0 first)."""
    port = free_port()
    procs = []
    for pid in range(2):
        e = env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(cmd, env=e, cwd=ROOT, stdout=open(logs / f"p{pid}.log", "a"), stderr=subprocess.STDOUT))
    return procs


def steps(out) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and (d / n / "adapter").is_dir()) if d.is_dir() else []


@pytest.mark.slow
def test_two_process_job_killed_and_resumed_equals_one_process(tmp_path, capsys):
    from train.testing import make_tiny_model

    model = make_tiny_model(str(tmp_path / "tiny"))
    lines = open(os.path.join(ROOT, "data", "sql", "train.jsonl")).read().splitlines()
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:40]) + "\n")
    data, a, b = tmp_path / "d.jsonl", tmp_path / "a", tmp_path / "b"

    one = env(8, JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")
    single = subprocess.Popen(command(model, data, a), env=one, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = job(command(model, data, b), tmp_path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs) and not steps(b):
            time.sleep(0.02)
        for p in reversed(procs):  # SIGKILL mid-way: process 1, then (as a scheduler would) the rest
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, (tmp_path / "p0.log").read_text()[-3000:]
        saved = steps(b)
        assert saved and saved[-1] < STEPS and not (b / "adapter").exists()

        # the job's newest checkpoint, exported here on one CPU device (it reads the adapter only)
        rc = cli(["export", "--base", model, "--adapter", str(b), "--format", "peft", "--out", str(tmp_path / "x")])
        assert rc == 0, capsys.readouterr().err
        exported = (tmp_path / "x" / "adapter_model.safetensors").read_bytes()

        procs = job(command(model, data, b) + ["--resume"], tmp_path)
        for p in procs:
            p.wait(timeout=300)
        assert [p.returncode for p in procs] == [0, 0], (tmp_path / "p0.log").read_text()[-3000:] + (tmp_path / "p1.log").read_text()[-3000:]
        log, _ = single.communicate(timeout=300)
        assert single.returncode == 0, log[-3000:]
    finally:
        for p in [single, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    p0 = (tmp_path / "p0.log").read_text()
    assert "2 processes, 8 devices" in p0 and f"resumed from step {saved[-1]}" in p0
    assert (tmp_path / "p1.log").read_text().count("resumed from") == 0  # process 0 alone reports and writes
    name = "adapter_model.safetensors"
    assert (a / "checkpoints" / str(saved[-1]) / "adapter" / name).read_bytes() == exported
    assert (a / "adapter" / name).read_bytes() == (b / "adapter" / name).read_bytes()
