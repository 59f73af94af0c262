"""Sharded LoRA training: device mesh, partition rules (LoRA specs derived from kernels), placement.

Typical use (see `lora_jax.training.step` for the whole training loop):

    from lora_jax import sharding as shd
    shd.initialize_distributed()                       # no-op on one process
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1, tensor=1))
    specs = shd.param_specs(jax.eval_shape(...), shd.default_rules("llama"), mesh)
    params = shd.load_sharded(host_numpy_tree, shd.named_shardings(specs, mesh))
"""

from lora_jax.sharding.mesh import AXES, BATCH_AXES, MeshConfig, initialize_distributed, make_mesh
from lora_jax.sharding.placement import batch_sharding, init_sharded, inject_sharded, load_sharded, shard_batch, to_host
from lora_jax.sharding.rules import GPT2_RULES, LLAMA_RULES, check_spec, default_rules, named_shardings, param_specs

__all__ = [
    "AXES", "BATCH_AXES", "GPT2_RULES", "LLAMA_RULES", "MeshConfig", "batch_sharding", "check_spec",
    "default_rules", "init_sharded", "initialize_distributed", "inject_sharded", "load_sharded",
    "make_mesh", "named_shardings", "param_specs", "shard_batch", "to_host",
]
