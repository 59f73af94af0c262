"""benchmarks/bench_gpu.py and check_gpu_attention.py run end to end in --tiny mode on CPU."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_gpu_tiny_smoke_run(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--steps", "2",
                           "--warmup", "1", "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| jax_") or
            line.startswith("| peft")}
    assert set(rows) == {"jax_lora", "jax_full", "peft"}
    for side, line in rows.items():
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert float(cells[0]) > 0 and float(cells[1].replace(",", "")) > 0, line  # step ms, tokens/s
    assert "LoRA / full step time:" in text
    assert "attention=auto uses reference for (cpu, bfloat16, head_dim 16, 4/2 heads, T=128 S=128, causal mask)" in text


@pytest.mark.slow
def test_check_gpu_attention_tiny_smoke_run():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_gpu_attention.py"), "--impl", "xla", "--tiny",
                           "--repeats", "1"], capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 12 and all(line.endswith("| yes |") for line in rows), proc.stdout
