"""benchmarks/gpu_session.sh (check_gpu_attention.py, then bench_gpu.py) runs end to end in --tiny mode on CPU."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_session_tiny_smoke_run(tmp_path):
    """benchmarks/gpu_session.sh --tiny: the attention check and the step benchmark, their files in $OUT."""
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--tiny"], capture_output=True, text=True,
                          timeout=1200, env=dict(os.environ, OUT=str(tmp_path), PY=sys.executable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check_gpu_attention: exit 0" in proc.stdout and "bench_gpu tiny: exit 0" in proc.stdout, proc.stdout[-3000:]
    assert "jax " in (tmp_path / "gpu_device.txt").read_text()

    check = (tmp_path / "gpu_attention_check.md").read_text()
    rows = [line for line in check.splitlines() if line.startswith("| 16 |")]
    assert len(rows) == 12 and all(line.endswith("| yes |") for line in rows), check

    text = (tmp_path / "gpu_tiny.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| jax_") or
            line.startswith("| peft")}
    assert set(rows) == {"jax_lora", "jax_full", "peft"}
    for side, line in rows.items():
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert float(cells[0]) > 0 and float(cells[1].replace(",", "")) > 0, line  # step ms, tokens/s
    assert "LoRA / full step time:" in text
    assert "attention=auto uses reference for (cpu, bfloat16, head_dim 16, 4/2 heads, T=128 S=128, causal mask)" in text
