"""Gemma 3 and Qwen3-MoE on 8 CPU devices (one subprocess, tests/families_worker.py) equal one device:
Gemma over (data, fsdp, tensor) = (2, 2, 2); the MoE with experts split over an 'expert' axis of 4."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("families") / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.path.dirname(HERE))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "families_worker.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_gemma_sharded_equals_one_device(results):
    r = results["gemma"]
    assert r["logits_diff"] <= 1e-5 * r["logits_max"] and r["grad_diff"] <= 1e-5 * r["grad_max"], r
    assert r["n_grads"] == 21  # 7 linear modules x (lora_a, lora_b, lora_scale)


def test_moe_expert_parallel_equals_one_device(results):
    r = results["moe"]
    assert r["shard_map"], r  # the expert-parallel path ran
    assert r["expert_kernel_shard"] == [2, 2, 32, 32]  # [layers, 8 experts / 4 devices, D, 2F]
    assert r["expert_lora_a_shard"][:2] == [2, 2] and "'expert'" in r["expert_lora_a_spec"]
    assert r["logits_diff"] <= 1e-5 * r["logits_max"] and r["grad_diff"] <= 1e-5 * r["grad_max"], r
