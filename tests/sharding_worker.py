"""Subprocess worker for the multi-device tests (run with a forced CPU device count).

    python tests/sharding_worker.py meshes   OUT.json          # 8 devices: every mesh vs 1 device
    python tests/sharding_worker.py restore  OUT.json CKPTDIR  # 8 devices: save on one mesh, restore on another
    python tests/sharding_worker.py multihost OUT.json PORT PID NPROC   # 4 devices per process, gloo

The pytest process never changes its own device count; tests run this file with
XLA_FLAGS=--xla_force_host_platform_device_count=N and read the JSON it writes. `train(...)` is
importable, so the single-device reference can be computed anywhere with the same seeds.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np

LORA = dict(r=4, alpha=8.0, target_modules="all-linear")
SHAPE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=8)
MESHES = {"1": (1, 1, 1), "8data": (8, 1, 1), "2data4fsdp": (2, 4, 1), "2fsdp4tensor": (1, 2, 4)}


def host_batches(steps: int, accum: int, micro: int, T: int = 16, seed: int = 0) -> list[dict]:
    """Fixed random batches [accum, micro, T] with a response-only loss mask (HF labels style)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, SHAPE["vocab_size"], (accum, micro, T)).astype(np.int32)
        labels = ids.copy()
        labels[..., : T // 4] = -100  # the "prompt" is not trained on
        out.append({"input_ids": ids, "labels": labels})
    return out


@functools.lru_cache(maxsize=None)
def host_params(scan: bool, seed: int = 0):
    """The base model's params as host numpy arrays (same values stacked or not)."""
    import jax

    from lora_jax.models import ModelConfig, build_model, stack_layers

    base = build_model(ModelConfig(**SHAPE), scan_layers=False)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = jax.jit(base.init)(jax.random.key(seed), np.zeros((1, 4), np.int32))["params"]
        params = jax.tree.map(np.asarray, params)
    return stack_layers(params) if scan else params


def setup(mesh, scan: bool, seed: int = 0):
    """(model, frozen, lora, specs) with params created on the host then placed sharded on `mesh`."""
    import jax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax.models import ModelConfig, build_model

    cfg = lora_jax.LoraConfig(**LORA)
    model = build_model(ModelConfig(**SHAPE), scan_layers=scan, lora=cfg)
    params = host_params(scan, seed)
    abstract = jax.eval_shape(lambda p: lora_jax.inject(p, cfg, jax.random.key(0)), params)
    specs = shd.param_specs(abstract, shd.default_rules("llama"), mesh, min_size=0)
    lora_specs, frozen_specs = lora_jax.split(specs)
    frozen = shd.load_sharded(params, shd.named_shardings(frozen_specs, mesh))
    lora = shd.inject_sharded(frozen, cfg, jax.random.key(seed + 1), shd.named_shardings(lora_specs, mesh))
    return model, frozen, lora, specs


def optimizer(lr: float = 0.5):
    """Clip + SGD with momentum: linear in the gradients, so sharding round-off is not amplified
    the way Adam amplifies it on near-zero gradients (it still has per-leaf optimizer state)."""
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr, momentum=0.9))


def train(mesh, scan: bool, steps: int = 3, accum: int = 2, micro: int = 8, batches=None, lr: float = 0.5):
    """Train a few steps; returns (losses, grad_norms, lora, state, frozen, step, specs, lora0)."""
    import jax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax import training

    model, frozen, lora, specs = setup(mesh, scan)
    lora0 = gather(lora)
    tx = optimizer(lr)
    state = training.init_train_state(lora, tx, jax.random.key(7), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = training.make_train_step(model, tx, mesh, specs, schedule=lr)
    losses, norms = [], []
    for b in batches or host_batches(steps, accum, micro):
        state, m = step(state, frozen, shd.shard_batch(b, mesh, batch_axis=1))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return losses, norms, gather(state["lora"]), state, frozen, step, specs, lora0


def gather(tree):
    """Global numpy values of a (possibly multi-process) sharded tree."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, tree)


def max_rel(a, b) -> float:
    """Largest relative difference over leaves: max|a-b| / max|b| per leaf."""
    import jax

    errs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12)), a, b))
    return max(errs)


def flat(tree) -> dict:
    import jax

    from lora_jax.targeting import path_key

    return {".".join(path_key(p)): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def count_all_gathers(mesh, scan: bool, loss_chunk: int) -> int:
    """All-gather ops in the compiled train step (several LM-head/loss chunks per step)."""
    import re

    import jax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax import training

    model, frozen, lora, specs = setup(mesh, scan)
    tx = optimizer()
    state = training.init_train_state(lora, tx, jax.random.key(7), mesh=mesh, lora_specs=lora_jax.split(specs)[0])
    step = training.make_train_step(model, tx, mesh, specs, schedule=0.5, loss_chunk=loss_chunk)
    batch = shd.shard_batch(host_batches(1, 2, 8)[0], mesh, batch_axis=1)
    return len(re.findall(r"all-gather(?:-start)?\(", step.lower(state, frozen, batch).compile().as_text()))


def run_meshes() -> dict:
    import jax

    from lora_jax import sharding as shd

    devs = jax.devices()
    out: dict = {"n_devices": len(devs)}
    for scan in (True, False):
        ref = None
        for name, (d, f, t) in MESHES.items():
            mesh = shd.make_mesh(shd.MeshConfig(d, f, t), devs[: d * f * t])
            losses, norms, lora, state, frozen, _, specs, lora0 = train(mesh, scan)
            frozen_before = host_params(scan)
            rec = {"losses": losses, "grad_norms": norms,
                   "frozen_identical": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen_before),
                                                                                  jax.tree.leaves(gather(frozen))))}
            # addressable shard shapes of every kernel / LoRA leaf vs the expected 1/N split
            shards = {}
            for key, arr in {**flat(frozen), **flat(state["lora"])}.items():
                shapes = sorted({tuple(s.data.shape) for s in arr.addressable_shards})
                shards[key] = {"global": list(arr.shape), "local": [list(s) for s in shapes],
                               "spec": [None if e is None else (list(e) if isinstance(e, tuple) else e) for e in arr.sharding.spec]}
            rec["shards"] = shards
            if name == "8data":  # pure data parallelism: params replicated, nothing to all-gather
                rec["all_gathers"] = count_all_gathers(mesh, scan, loss_chunk=32)  # 4 positions x 8 rows per chunk
            if ref is None:
                ref = (losses, norms, lora)
                if scan:  # the single-device reference the multi-process test compares against
                    out["reference"] = {"losses": losses, "lora": jax.tree.map(lambda x: x.tolist(), flat(lora))}
            if name == "2data4fsdp" and scan:
                accum_ref = (losses, norms, lora)
            rec["loss_rel"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref[0]))
            rec["norm_rel"] = max(abs(a - b) / abs(b) for a, b in zip(norms, ref[1]))
            rec["lora_rel"] = max_rel(lora, ref[2])
            rec["lora_change"] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(lora0)))
            out[f"{name}/scan={scan}"] = rec
    # gradient accumulation: 2 x 8 == 1 x 16 (same rows, same order), on the 2 data x 4 fsdp mesh
    mesh = shd.make_mesh(shd.MeshConfig(2, 4, 1), devs)
    one = [{k: v.reshape(1, 16, -1) for k, v in b.items()} for b in host_batches(3, 2, 8)]
    l2, n2, lo2 = accum_ref
    l1, n1, lo1, *_ = train(mesh, True, batches=one)
    out["accum"] = {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(l2, l1)),
                    "norm_rel": max(abs(a - b) / abs(b) for a, b in zip(n2, n1)), "lora_rel": max_rel(lo2, lo1)}
    return out


def run_restore(ckpt_dir: str) -> dict:
    """Train on 2 data x 4 fsdp, save, restore onto 2 fsdp x 4 tensor and onto 1 device; continue."""
    import jax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax import training

    devs = jax.devices()
    mesh_a = shd.make_mesh(shd.MeshConfig(2, 4, 1), devs)
    _, _, lora_a, state, frozen, step, specs, _ = train(mesh_a, True, steps=2)
    saved = gather(state)
    with training.Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
        ckpt.save(int(state["step"]), state, {"data": {"epoch": 0, "index": 32}})
    out = {}
    for name, (d, f, t) in (("2fsdp4tensor", (1, 2, 4)), ("1", (1, 1, 1))):
        mesh_b = shd.make_mesh(shd.MeshConfig(d, f, t), devs[: d * f * t])
        model, frozen_b, _, specs_b = setup(mesh_b, True)
        target = training.abstract_state(state, mesh_b, lora_jax.split(specs_b)[0])
        with training.Checkpointer(ckpt_dir) as ckpt:
            restored, meta = ckpt.restore(target=target)
            latest = ckpt.latest_step()
        exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(gather(restored))))
        on_target = all(x.sharding == s.sharding for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
        # one more step on each mesh from the same state gives the same loss
        step_b = training.make_train_step(model, optimizer(), mesh_b, specs_b, schedule=0.5)
        b = host_batches(1, 2, 8, seed=9)[0]
        _, m_b = step_b(restored, frozen_b, shd.shard_batch(b, mesh_b, 1))
        out[name] = {"exact": exact, "on_target": on_target, "meta": meta, "latest": latest, "loss_next": float(m_b["loss"])}
    _, m_a = step(state, frozen, shd.shard_batch(host_batches(1, 2, 8, seed=9)[0], mesh_a, 1))
    out["loss_next_source"] = float(m_a["loss"])
    return out


def run_multihost(port: int, pid: int, nproc: int) -> dict:
    import jax

    from lora_jax import sharding as shd

    shd.initialize_distributed(f"localhost:{port}", nproc, pid)
    mesh = shd.make_mesh(shd.MeshConfig(2, -1, 1))
    losses, norms, lora, *_ = train(mesh, True, steps=3)
    return {"process_count": jax.process_count(), "devices": jax.device_count(), "local": jax.local_device_count(),
            "losses": losses, "grad_norms": norms, "lora": jax.tree.map(lambda x: x.tolist(), flat(lora))}


if __name__ == "__main__":
    mode, out_path = sys.argv[1], sys.argv[2]
    if mode == "meshes":
        result = run_meshes()
    elif mode == "restore":
        result = run_restore(sys.argv[3])
    elif mode == "multihost":
        result = run_multihost(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if out_path != "-":
        with open(out_path, "w") as f:
            json.dump(result, f)
