"""Subprocess worker: QLoRA (NF4 base) trained on several 8-device meshes vs one device.

    python tests/quant_sharding_worker.py OUT.json      # run with --xla_force_host_platform_device_count=8

Reuses the plain sharding worker's model, batches and optimizer; only the base is quantized.
"""

from __future__ import annotations

import json
import sys

import numpy as np

import sharding_worker as sw

MESHES = {"1": (1, 1, 1), "2data4fsdp": (2, 4, 1), "2fsdp4tensor": (1, 2, 4)}


def train(mesh, steps: int = 3):
    import jax

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax import training
    from lora_jax.models import ModelConfig, build_model

    cfg = lora_jax.LoraConfig(**sw.LORA)
    model = build_model(ModelConfig(**sw.SHAPE), scan_layers=True, lora=cfg)
    params = lora_jax.quantize(sw.host_params(True), "nf4", block_size=16)
    abstract = jax.eval_shape(lambda p: lora_jax.inject(p, cfg, jax.random.key(0)), params)
    specs = shd.param_specs(abstract, shd.default_rules("llama"), mesh, min_size=0)
    lora_specs, frozen_specs = lora_jax.split(specs)
    frozen = shd.load_sharded(params, shd.named_shardings(frozen_specs, mesh))
    lora = shd.inject_sharded(frozen, cfg, jax.random.key(1), shd.named_shardings(lora_specs, mesh))
    tx = sw.optimizer()
    state = training.init_train_state(lora, tx, jax.random.key(7), mesh=mesh, lora_specs=lora_specs)
    step = training.make_train_step(model, tx, mesh, specs, schedule=0.5)
    losses = []
    for b in sw.host_batches(steps, 2, 8):
        state, m = step(state, frozen, shd.shard_batch(b, mesh, batch_axis=1))
        losses.append(float(m["loss"]))
    codes = frozen["model"]["layers"]["mlp"]["down_proj"]["kernel"].codes
    local = sorted({tuple(s.data.shape) for s in codes.addressable_shards})
    same_frozen = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sw.gather(frozen))))
    return losses, sw.gather(state["lora"]), {"codes_global": list(codes.shape), "codes_local": [list(s) for s in local],
                                               "frozen_identical": same_frozen}


def main(out_path: str) -> None:
    import jax

    from lora_jax import sharding as shd

    out: dict = {"n_devices": len(jax.devices())}
    ref = None
    for name, (d, f, t) in MESHES.items():
        mesh = shd.make_mesh(shd.MeshConfig(d, f, t), jax.devices()[: d * f * t])
        losses, lora, info = train(mesh)
        if ref is None:
            ref = (losses, lora)
        out[name] = {**info, "losses": losses, "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref[0])),
                     "lora_rel": sw.max_rel(lora, ref[1])}
    with open(out_path, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(sys.argv[1])
