"""Checkpointer: exact round trip, metadata, keep-N, latest_step, atomicity, restore onto another mesh."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax import sharding as shd
from lora_jax import training

HERE = pathlib.Path(__file__).resolve().parent
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    lora = {"layers": {"q_proj": {"lora_a": jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32),
                                  "lora_b": jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)}}}
    state = training.init_train_state(lora, optax.adamw(1e-3), jax.random.key(seed))
    state["step"] = jnp.int32(seed)
    return state


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_with_metadata(tmp_path):
    state = make_state(3)
    with training.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(target=state)
        assert ckpt.save(3, state, {"data": {"epoch": 1, "index": 7}, "config_hash": "abc"})
        restored, meta = ckpt.restore(target=state)
    assert_same(restored, state)
    assert meta == {"data": {"epoch": 1, "index": 7}, "config_hash": "abc"}
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), state["lora"])
    with training.Checkpointer(tmp_path) as ckpt:  # a fresh manager (a resumed run) finds it
        assert ckpt.latest_step() == 3
        restored, _ = ckpt.restore(target=training.abstract_state(state, mesh, specs))
    assert_same(restored, state)
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(restored))


def test_keeps_the_newest_n_and_restores_any_kept_step(tmp_path):
    with training.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, make_state(s), {"s": s})
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        restored, meta = ckpt.restore(2, target=make_state(0))
        assert meta == {"s": 2}
        assert_same(restored, make_state(2))
        with pytest.raises(FileNotFoundError, match="step 1"):
            ckpt.restore(1, target=make_state(0))


def test_an_interrupted_save_is_never_picked_up(tmp_path):
    with training.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1))
    # what a crash mid-save leaves behind: orbax's temporary directory, never renamed into place
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "2.orbax-checkpoint-tmp-123" / "state").mkdir()
    with training.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, _ = ckpt.restore(target=make_state(0))
    assert_same(restored, make_state(1))


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "sharding_worker.py"), "restore", str(out), str(tmp_path / "ckpt")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    for name in ("2fsdp4tensor", "1"):  # saved on 2 data x 4 fsdp
        assert r[name]["exact"] and r[name]["on_target"], r[name]
        assert r[name]["latest"] == 2 and r[name]["meta"] == {"data": {"epoch": 0, "index": 32}}
        assert r[name]["loss_next"] == pytest.approx(r["loss_next_source"], rel=1e-5)
