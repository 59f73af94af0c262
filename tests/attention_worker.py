"""Subprocess worker: the sharded train step with each CPU-runnable attention implementation equals
the single-device reference run (run with 8 forced CPU devices; writes JSON).

    python tests/attention_worker.py OUT.json IMPL [IMPL ...]

A tiny GQA Llama (8 heads, 4 KV heads), batches of packed and left-padded rows (segment ids,
restarting positions), T = 128 (splash's block), LoRA on all linear layers, 2 SGD steps. Meshes:
one device, 2 data x 4 fsdp, 2 fsdp x 4 tensor (splash is then `shard_map`ped over batch and heads).
"""

from __future__ import annotations

import json
import sys

import numpy as np

SHAPE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
             num_heads=8, num_kv_heads=4, head_dim=8)
MESHES = {"1": (1, 1, 1), "2data4fsdp": (2, 4, 1), "2fsdp4tensor": (1, 2, 4)}
T, MICRO = 128, 8


def batches(steps: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        ids = rng.integers(0, SHAPE["vocab_size"], (1, MICRO, T)).astype(np.int32)
        seg = np.zeros((1, MICRO, T), np.int32)
        pos = np.zeros((1, MICRO, T), np.int32)
        for r in range(MICRO):
            if r % 2:  # left padding
                start = int(rng.integers(1, T // 2))
                seg[0, r, start:] = 1
                pos[0, r, start:] = np.arange(T - start)
            else:  # packed examples, padding at the end
                at, s = 0, 1
                while at < T - 8:
                    n = int(rng.integers(8, 48))
                    n = min(n, T - 8 - at)
                    seg[0, r, at : at + n], pos[0, r, at : at + n] = s, np.arange(n)
                    at, s = at + n, s + 1
        out.append({"input_ids": ids, "targets": np.roll(ids, -1, -1), "loss_mask": (seg > 0).astype(np.float32),
                    "segment_ids": seg, "positions": pos})
    return out


def train(mesh_shape, impl: str) -> dict:
    import jax
    import optax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax import training
    from lora_jax.models import ModelConfig, build_model

    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = shd.make_mesh(shd.MeshConfig(*mesh_shape), devices=devices)
    cfg = lora_jax.LoraConfig(r=4, alpha=8.0, target_modules="all-linear")
    model = build_model(ModelConfig(**SHAPE), scan_layers=True, lora=cfg, attention=impl)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.key(0), np.zeros((1, T), np.int32))["params"])
    abstract = jax.eval_shape(lambda p: lora_jax.inject(p, cfg, jax.random.key(0)), params)
    specs = shd.param_specs(abstract, shd.default_rules("llama"), mesh, min_size=0)
    lora_specs, frozen_specs = lora_jax.split(specs)
    frozen = shd.load_sharded(params, shd.named_shardings(frozen_specs, mesh))
    lora = shd.inject_sharded(frozen, cfg, jax.random.key(1), shd.named_shardings(lora_specs, mesh))
    lora = jax.tree_util.tree_map_with_path(  # nonzero B, so every adapter leaf gets a gradient
        lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, lora)
    tx = optax.sgd(0.5)
    state = training.init_train_state(lora, tx, jax.random.key(2), mesh=mesh, lora_specs=lora_specs)
    step = training.make_train_step(model, tx, mesh, specs, dropout=False)
    lora0 = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(lora)])
    losses, manual = [], False
    for i, b in enumerate(batches()):
        b = shd.shard_batch(b, mesh, batch_axis=1)
        if i == 0:  # a shard_map'ped kernel shows as manual sharding in the lowered step
            text = step.lower(state, frozen, b).as_text()
            manual = "SPMDFullToShardShape" in text or "sdy.manual_computation" in text
        state, m = step(state, frozen, b)
        losses.append(float(m["loss"]))
    leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state["lora"])]
    return {"losses": losses, "lora": np.concatenate(leaves).tolist(), "manual": manual, "lora0": lora0.tolist()}


def main() -> None:
    out, impls = sys.argv[1], sys.argv[2:]
    ref = train(MESHES["1"], "reference")
    rec = {}
    for impl in impls:
        for name, shape in MESHES.items():
            got = train(shape, impl)
            rec[f"{impl}/{name}"] = {
                "loss_diff": max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])),
                "lora_diff": float(np.abs(np.array(got["lora"]) - np.array(ref["lora"])).max()),
                "lora_change": float(np.abs(np.array(ref["lora"]) - np.array(ref["lora0"])).max()),
                "shard_map": got["manual"],
            }
    with open(out, "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
