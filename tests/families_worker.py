"""Subprocess worker for tests/test_families_sharding.py (run with 8 forced CPU devices).

    python tests/families_worker.py OUT.json

Gemma 3 (scanned, sliding + global layers, LoRA on all linear layers) on a (data 2, fsdp 2, tensor 2)
mesh, and Qwen3-MoE (scanned, 8 experts, LoRA on q/v and on both expert tensors) on a
(data 2, fsdp 1, expert 4, tensor 1) mesh with expert parallelism, each against the same computation on one device:
logits and LoRA gradients. Writes max differences and what the sharded run looked like.
"""

from __future__ import annotations

import json
import sys

import numpy as np

GEMMA = dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8, tie_word_embeddings=True, qk_norm=True, sliding_window=3,
             sliding_layers=(True, False), hidden_act="gelu_pytorch_tanh", attn_scale=12**-0.5, norm_plus_one=True,
             embed_scale=True, attn_softcap=5.0, final_softcap=8.0, rope_theta=1e6, rope_local_theta=100.0)
MOE = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
           num_kv_heads=2, head_dim=8, qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)


def run(shape, lora_kwargs, mesh):
    """(logits, lora grads) of a random model with a random adapter; sharded over `mesh` unless None."""
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax import sharding as shd
    from lora_jax.models import ModelConfig, build_model

    cfg = ModelConfig(**shape)
    lcfg = lora_jax.LoraConfig(**lora_kwargs)
    model = build_model(cfg, scan_layers=True, lora=lcfg, remat=None)
    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (4, 8)).astype(np.int32)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = build_model(cfg, scan_layers=True).init(jax.random.key(0), ids[:1])["params"]
        params = lora_jax.inject(params, lcfg, jax.random.key(1))
        params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * np.random.default_rng(x.size).normal(size=x.shape).astype(np.float32)
                              if x.ndim >= 2 else np.asarray(x), params)  # nonzero B
    lora, frozen = lora_jax.split(params)

    def loss(lora, frozen, ids):
        logits, _ = model.apply({"params": lora_jax.combine(frozen, lora)}, ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    fn = jax.value_and_grad(loss, has_aux=True)
    if mesh is None:
        (_, logits), grads = jax.jit(fn)(lora, frozen, ids)
        return np.asarray(logits), grads, {}
    specs = shd.param_specs(params, shd.default_rules(shape["model_type"]), mesh, min_size=0)
    lspecs, fspecs = lora_jax.split(specs)
    put = lambda tree, sp: jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), tree, sp)  # noqa: E731
    lora_s, frozen_s = put(lora, lspecs), put(frozen, fspecs)
    ids_s = jax.device_put(ids, jax.NamedSharding(mesh, jax.P(("data",) + (("fsdp",) if "fsdp" in mesh.axis_names else ()))))
    with jax.set_mesh(mesh):
        traced = jax.jit(fn).trace(lora_s, frozen_s, ids_s)  # one trace: inspected, then compiled
        (_, logits), grads = traced.lower().compile()(lora_s, frozen_s, ids_s)
    info = {"shard_map": "shard_map" in str(traced.jaxpr)}
    if shape is MOE:
        k = frozen_s["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
        a = lora_s["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["lora_a"]
        info["expert_kernel_shard"] = list(k.addressable_shards[0].data.shape)
        info["expert_lora_a_shard"] = list(a.addressable_shards[0].data.shape)
        info["expert_lora_a_spec"] = str(a.sharding.spec)
    return np.asarray(logits), grads, info


def compare(shape, lora_kwargs, mesh):
    import jax

    ref_logits, ref_grads, _ = run(shape, lora_kwargs, None)
    logits, grads, info = run(shape, lora_kwargs, mesh)
    gdiff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)))
    gmax = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(ref_grads))
    return dict(info, logits_diff=float(np.abs(logits - ref_logits).max()), logits_max=float(np.abs(ref_logits).max()),
                grad_diff=gdiff, grad_max=gmax, n_grads=len(jax.tree.leaves(grads)))


def main(out):
    import jax
    from jax.sharding import AxisType, Mesh

    from lora_jax.sharding import MeshConfig, make_mesh

    assert jax.device_count() == 8, jax.device_count()
    res = {"gemma": compare(GEMMA, dict(r=2, alpha=4, target_modules="all-linear"), make_mesh(MeshConfig(2, 2, 2)))}
    ep = Mesh(np.asarray(jax.devices()).reshape(2, 1, 4, 1), ("data", "fsdp", "expert", "tensor"),
              axis_types=(AxisType.Auto,) * 4)
    moe_lora = dict(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    res["moe"] = compare(MOE, moe_lora, ep)
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
