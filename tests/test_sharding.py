"""Mesh, partition rules, placement; multi-device training equivalence in an 8-device subprocess;
a 2-process x 4-device run over gloo. The pytest process itself keeps its single CPU device."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import sharding as shd
from lora_jax.models import ModelConfig, build_model, param_shapes

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "sharding_worker.py"
# Compile-time-only XLA flags for the subprocesses (every mesh and its reference run under the same
# flags, so comparisons are unaffected): ~30-50% less compile time, which dominates these tests.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESH_2x4 = AbstractMesh((2, 4, 1), shd.AXES)
MESH_2x4T = AbstractMesh((1, 2, 4), shd.AXES)


def run_worker(args: list[str], n_devices: int, timeout: float) -> None:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices} {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(WORKER), *args], env=env, timeout=timeout, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# -- mesh -------------------------------------------------------------------------------------------
def test_mesh_config_resolves_and_validates():
    assert shd.MeshConfig().resolve(8) == (1, 8, 1)
    assert shd.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        shd.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="positive integer"):
        shd.MeshConfig(tensor=0)
    with pytest.raises(ValueError, match="do not divide"):
        shd.MeshConfig(data=3).resolve(8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        shd.MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
    mesh = shd.make_mesh(shd.MeshConfig(), jax.devices()[:1])
    assert mesh.axis_names == shd.AXES and mesh.devices.shape == (1, 1, 1)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "MASTER_ADDR", "JAX_NUM_PROCESSES", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert shd.initialize_distributed() is False
    assert shd.initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="pass both"):
        shd.initialize_distributed("localhost:1234")


# -- rules -------------------------------------------------------------------------------------------
def llama_shapes(scan: bool, lora: bool = True):
    model = build_model(ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8), scan_layers=scan)
    shapes = param_shapes(model)
    if lora:
        cfg = lora_jax.LoraConfig(r=4, target_modules="all-linear")
        shapes = jax.eval_shape(lambda p: lora_jax.inject(p, cfg, jax.random.key(0)), shapes)
    return shapes


@pytest.mark.parametrize("scan", [True, False])
def test_lora_specs_are_derived_from_the_kernel_spec_stacked_or_not(scan):
    specs = shd.param_specs(llama_shapes(scan), shd.default_rules("llama"), MESH_2x4T, min_size=0)
    layer = specs["model"]["layers"] if scan else specs["model"]["layers"]["1"]
    lead = (None,) if scan else ()
    q, o = layer["self_attn"]["q_proj"], layer["self_attn"]["o_proj"]
    assert q["kernel"] == P(*lead, "fsdp", "tensor")  # column parallel
    assert q["lora_a"] == P(*lead, "fsdp", None) and q["lora_b"] == P(*lead, None, "tensor")
    assert o["kernel"] == P(*lead, "tensor", "fsdp")  # row parallel
    assert o["lora_a"] == P(*lead, "tensor", None) and o["lora_b"] == P(*lead, None, "fsdp")
    down = layer["mlp"]["down_proj"]
    assert down["lora_a"] == P(*lead, "tensor", None) and down["lora_b"] == P(*lead, None, "fsdp")
    assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    norm = layer["input_layernorm"]["scale"]
    assert all(e is None for e in norm)


def test_gpt2_default_rules_cover_every_param():
    cfg = lora_jax.LoraConfig(r=4, target_modules="all-linear")
    shapes = param_shapes(build_model(ModelConfig("gpt2", 64, 32, 128, 2, 4, 4, 8), scan_layers=True))
    shapes = jax.eval_shape(lambda p: lora_jax.inject(p, cfg, jax.random.key(0)), shapes)
    specs = shd.param_specs(shapes, shd.default_rules("gpt2"), MESH_2x4T, min_size=0)
    h = specs["transformer"]["h"]
    assert h["attn"]["c_attn"]["kernel"] == P(None, "fsdp", "tensor")
    assert h["attn"]["c_attn"]["lora_b"] == P(None, None, "tensor")
    assert h["mlp"]["c_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert h["mlp"]["c_proj"]["lora_a"] == P(None, "tensor", None)


def test_unmatched_large_param_and_misfit_spec_are_clear_errors():
    shapes = {"mystery": {"kernel": jax.ShapeDtypeStruct((512, 512), jnp.float32)}}
    with pytest.raises(ValueError, match=r"no partition rule matches 'mystery.kernel' of shape \(512, 512\)"):
        shd.param_specs(shapes, shd.default_rules("llama"))
    assert shd.param_specs({"tiny": jax.ShapeDtypeStruct((4,), jnp.float32)}, [], min_size=16) == {"tiny": P(None)}
    bad = {"q_proj": {"kernel": jax.ShapeDtypeStruct((30, 32), jnp.float32)}}
    with pytest.raises(ValueError, match=r"'q_proj.kernel' of shape \(30, 32\).*'fsdp' has 4 devices"):
        shd.param_specs(bad, shd.default_rules("llama"), MESH_2x4)
    with pytest.raises(ValueError, match="names mesh axis 'model'"):
        shd.param_specs(bad, [("kernel", P("model"))], MESH_2x4)
    with pytest.raises(ValueError, match="no default partition rules"):
        shd.default_rules("bert")


def test_placement_creates_sharded_arrays_with_the_right_values():
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    host = {"w": np.arange(12, dtype=np.float32).reshape(4, 3)}
    out = shd.load_sharded(host, {"w": jax.sharding.NamedSharding(mesh, P("fsdp"))}, dtypes=jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and np.array_equal(np.asarray(out["w"], np.float32), host["w"])
    frozen = {"q_proj": {"kernel": jnp.zeros((8, 8))}}
    cfg = lora_jax.LoraConfig(r=2, target_modules=["q_proj"])
    sh = jax.sharding.NamedSharding(mesh, P())
    lora = shd.inject_sharded(frozen, cfg, jax.random.key(3), {"q_proj": {"lora_a": sh, "lora_b": sh}})
    ref = lora_jax.split(lora_jax.inject(frozen, cfg, jax.random.key(3)))[0]
    assert np.array_equal(lora["q_proj"]["lora_a"], ref["q_proj"]["lora_a"])
    with pytest.raises(ValueError, match="not divisible"):
        shd.shard_batch({"input_ids": np.zeros((3, 4))}, MESH_2x4)


# -- 8 devices in a subprocess --------------------------------------------------------------------
@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes") / "out.json"
    run_worker(["meshes", str(out)], 8, timeout=400)
    return json.loads(out.read_text())


RUNS = [f"{m}/scan={s}" for s in (True, False) for m in ("1", "8data", "2data4fsdp", "2fsdp4tensor")]


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_every_mesh_trains_like_one_device(meshes, run):
    rec = meshes[run]
    assert rec["loss_rel"] < 1e-5 and rec["norm_rel"] < 1e-5
    assert rec["lora_rel"] < 1e-5  # LoRA params after 3 steps, per leaf max|diff| / max|ref|
    assert rec["lora_change"] > 1e-3  # they did train
    assert rec["frozen_identical"]  # frozen params bitwise unchanged


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_data_parallel_step_gathers_nothing(meshes, scan):
    # The chunked LM-head loss scans positions, keeping the batch axis sharded: no device gathers
    # the others' hidden states (scanning flattened tokens made GSPMD all-gather them).
    assert meshes[f"8data/scan={scan}"]["all_gathers"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_each_device_holds_its_fraction_of_sharded_kernels(meshes, scan):
    for mesh_name, n in (("2data4fsdp", {"fsdp": 4}), ("2fsdp4tensor", {"fsdp": 2, "tensor": 4})):
        shards = meshes[f"{mesh_name}/scan={scan}"]["shards"]
        checked = 0
        for name, s in shards.items():
            axes = [[a for a in (e if isinstance(e, list) else [e]) if a] for e in s["spec"]]
            factors = [int(np.prod([n.get(a, 1) for a in ax])) for ax in axes]
            factors += [1] * (len(s["global"]) - len(factors))  # a spec names only the leading axes
            assert s["local"] == [[d // f for d, f in zip(s["global"], factors)]], (name, s)  # one shard shape
            if name.endswith(("kernel", "embedding")):
                used = {a for ax in axes for a in ax}
                assert used, name  # every big matrix is sharded
                frac = np.prod(s["local"][0]) / np.prod(s["global"])
                assert frac == 1 / np.prod([n.get(a, 1) for a in used]), (name, frac)  # ~1/N of it per device
                checked += 1
        assert checked >= 7  # q/k/v/o/gate/up/down (+ embeddings, head)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(meshes):
    acc = meshes["accum"]
    assert acc["loss_rel"] < 1e-5 and acc["norm_rel"] < 1e-5 and acc["lora_rel"] < 1e-5


# -- 2 processes x 4 devices ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_the_single_process_run(meshes, tmp_path):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}", JAX_PLATFORMS="cpu")
    port, procs = free_port(), []
    try:
        for pid in range(2):
            out = tmp_path / f"p{pid}.json"
            log = open(tmp_path / f"p{pid}.log", "w")
            procs.append((subprocess.Popen([sys.executable, str(WORKER), "multihost", str(out), str(port), str(pid), "2"],
                                           env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for p, _ in procs:
            p.wait(timeout=240)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for pid, (p, _) in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"p{pid}.log").read_text()[-4000:]
    ref = meshes["reference"]
    for pid in range(2):
        got = json.loads((tmp_path / f"p{pid}.json").read_text())
        assert got["process_count"] == 2 and got["devices"] == 8 and got["local"] == 4
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
        for k, v in ref["lora"].items():
            v = np.asarray(v)
            assert np.abs(np.asarray(got["lora"][k]) - v).max() <= 1e-5 * np.abs(v).max(), k
