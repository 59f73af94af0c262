"""Subprocess worker: DoRA on a 4-device CPU mesh (fsdp 2 x tensor 2), scanned layers; run with
XLA_FLAGS=--xla_force_host_platform_device_count=4. Writes {"err": max |sharded - single| logits,
"mag_spec": spec of one magnitude leaf, "grad_err": max |sharded - single| magnitude gradient}."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax import sharding as shd
from lora_jax.models import ModelConfig, build_model


def main(out):
    cfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)
    model = build_model(ModelConfig("llama", 64, 32, 64, 2, 4, 2, 8), scan_layers=True, lora=cfg)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    ids = np.random.default_rng(0).integers(0, 64, (4, 8)).astype(np.int32)
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=2))
    abstract = jax.eval_shape(lambda p: lora_jax.inject(p, cfg, jax.random.key(0)), params)
    specs = shd.param_specs(abstract, shd.default_rules("llama"), mesh, min_size=0)
    lora_specs, frozen_specs = lora_jax.split(specs)
    frozen = shd.load_sharded(params, shd.named_shardings(frozen_specs, mesh))
    lora = shd.inject_sharded(frozen, cfg, jax.random.key(1), shd.named_shardings(lora_specs, mesh))
    lora = jax.tree.map(lambda x: x * 1.1 + 0.01, lora)  # nonzero B, magnitude off the norm

    def loss(lora_, frozen_):
        return jnp.sum(model.apply({"params": lora_jax.combine(lora_, frozen_)}, ids)[0] ** 2) * 1e-3

    host = lambda t: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), t)  # noqa: E731
    logits_sh = np.asarray(jax.jit(lambda l, f: model.apply({"params": lora_jax.combine(l, f)}, ids)[0])(lora, frozen))
    g_sh = jax.jit(jax.grad(loss))(lora, frozen)
    lora_h, frozen_h = host(lora), host(frozen)
    with jax.default_device(jax.devices()[0]):
        logits_1 = np.asarray(model.apply({"params": lora_jax.combine(lora_h, frozen_h)}, ids)[0])
        g_1 = jax.grad(loss)(lora_h, frozen_h)
    q = lora["model"]["layers"]["self_attn"]["q_proj"]
    m_sh = np.asarray(g_sh["model"]["layers"]["self_attn"]["q_proj"]["lora_magnitude"])
    m_1 = np.asarray(g_1["model"]["layers"]["self_attn"]["q_proj"]["lora_magnitude"])
    json.dump({"err": float(np.abs(logits_sh - logits_1).max()), "mag_spec": str(q["lora_magnitude"].sharding.spec),
               "kernel_spec": str(frozen["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec),
               "grad_err": float(np.abs(m_sh - m_1).max()), "grad_max": float(np.abs(m_1).max())}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
