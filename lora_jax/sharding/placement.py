"""Creating and loading params *directly sharded*: no full copy ever sits on one device.

- `init_sharded(init_fn, shardings, *args)`: `jit(init_fn, out_shardings=...)` — each device
  computes only its own shard of a random init (XLA partitions the RNG and the fills).
- `inject_sharded(frozen, config, rng, shardings)`: the LoRA leaves for already-sharded frozen
  params, created in place by a jit whose only input is the PRNG key (the kernels are read for
  their shapes only, never moved).
- `load_sharded(host_arrays, shardings)`: host numpy arrays (e.g. from safetensors/GGUF, which
  are memory-mapped) -> global `jax.Array`s via `jax.make_array_from_callback`: each device
  copies only its slice; in a multi-process job each process touches only its devices' slices.
- `shard_batch(batch, mesh)`: a host batch (the same global numpy batch on every process) ->
  global arrays split over ('data', 'fsdp') on axis `batch_axis`.
- `to_host(tree)`: global arrays -> whole numpy arrays on every process (gathering the shards
  other processes hold; `np.asarray` fails on an array that is not fully addressable).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.config import PLAIN_INITS, LoraConfig
from lora_jax.sharding.mesh import BATCH_AXES
from lora_jax.targeting import KernelLayout
from lora_jax.transform import inject, split
from lora_jax.tree import CONSTANT_LEAVES, LORA_A


def init_sharded(init_fn: Callable[..., Any], shardings: Any, *args: Any) -> Any:
    """`init_fn(*args)` compiled with `out_shardings=shardings`: created sharded, never gathered.

    Use `jax.eval_shape(init_fn, *args)` to get the shapes `param_specs` needs first.

    >>> from lora_jax.sharding import make_mesh
    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> w = init_sharded(lambda k: jax.random.normal(k, (4, 4)), NamedSharding(mesh, P("fsdp")), jax.random.key(0))
    >>> w.sharding.spec
    P('fsdp',)
    """
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def inject_sharded(
    frozen: Any,
    config: LoraConfig,
    rng: jax.Array,
    shardings: Any,
    *,
    layouts: Mapping[str, KernelLayout] | None = None,
) -> Any:
    """The `lora` tree `split(inject(frozen, config, rng))[0]`, created directly with `shardings`.

    `shardings` is the tree of `NamedSharding`s for the LoRA leaves (e.g. `split` of
    `named_shardings(param_specs(...))`). Identical values to the unsharded `inject`.

    >>> import jax.numpy as jnp
    >>> from lora_jax.sharding import make_mesh
    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> cfg = LoraConfig(r=2, target_modules=["q"])
    >>> sh = {"q": {"lora_a": NamedSharding(mesh, P()), "lora_b": NamedSharding(mesh, P())}}
    >>> lora = inject_sharded({"q": {"kernel": jnp.zeros((4, 4))}}, cfg, jax.random.key(0), sh)
    >>> lora["q"]["lora_a"].shape
    (4, 2)
    """
    if config.init not in PLAIN_INITS:
        raise ValueError(f"init={config.init!r} rewrites the frozen kernels, which inject_sharded does not return; "
                         "call lora_jax.inject on the params (then place them) instead")
    if config.use_dora:  # DoRA's magnitude is the norm of the kernels: they enter as (sharded) arguments
        make_d = lambda key, fr: split(inject(fr, config, key, layouts=layouts))[0]  # noqa: E731
        return jax.jit(make_d, out_shardings=_with_constant_shardings(shardings, jax.eval_shape(make_d, rng, frozen)))(rng, frozen)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
    make = lambda key: split(inject(abstract, config, key, layouts=layouts))[0]  # noqa: E731
    return jax.jit(make, out_shardings=_with_constant_shardings(shardings, jax.eval_shape(make, rng)))(rng)


def _with_constant_shardings(shardings: Any, out: Any) -> Any:
    """Shardings for the adapters' constant leaves (`lora_scale`, `lora_rank`) in `out` where the
    caller gave only A/B's: replicated."""
    if not isinstance(shardings, Mapping) or not isinstance(out, Mapping):
        return shardings
    full = {k: _with_constant_shardings(shardings[k], out.get(k)) for k in shardings}
    if isinstance(full.get(LORA_A), NamedSharding):
        for leaf in CONSTANT_LEAVES:
            if leaf in out and leaf not in full:
                full[leaf] = NamedSharding(full[LORA_A].mesh, P())
    return full


def load_sharded(host_arrays: Any, shardings: Any, dtypes: Any = None) -> Any:
    """Host numpy arrays -> global sharded `jax.Array`s, each device receiving only its slice.

    `shardings` mirrors `host_arrays` (a single `Sharding` is broadcast); `dtypes` likewise
    optional (cast per slice, so a bf16 copy of a fp32 checkpoint is never materialised whole).

    >>> from lora_jax.sharding import make_mesh
    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> out = load_sharded({"w": np.ones((4, 2), np.float32)}, {"w": NamedSharding(mesh, P("fsdp"))})
    >>> out["w"].sharding.spec, float(out["w"].sum())
    (P('fsdp',), 8.0)
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, host_arrays)
    if dtypes is None:
        dtypes = jax.tree.map(lambda _: None, host_arrays)
    elif not isinstance(dtypes, Mapping):
        dtypes = jax.tree.map(lambda _: dtypes, host_arrays)

    def one(arr, sharding, dtype):
        dtype = np.dtype(dtype if dtype is not None else arr.dtype)
        return jax.make_array_from_callback(tuple(arr.shape), sharding, lambda idx: np.asarray(arr[idx], dtype=dtype))

    return jax.tree.map(one, host_arrays, shardings, dtypes, is_leaf=lambda x: x is None)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch array: axis `batch_axis` split over ('data', 'fsdp'), the rest replicated.

    >>> from lora_jax.sharding import make_mesh
    >>> batch_sharding(make_mesh(devices=jax.devices()[:1]), 3, batch_axis=1).spec
    P(None, ('data', 'fsdp'), None)
    """
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, batch_axis: int = 0) -> dict[str, jax.Array]:
    """Global host batch (identical on every process) -> arrays split over ('data', 'fsdp').

    For the train step's [accum, micro_batch, T] batches use `batch_axis=1`. The split axis must
    be divisible by data*fsdp.

    >>> from lora_jax.sharding import make_mesh
    >>> b = shard_batch({"input_ids": np.zeros((2, 4, 8), np.int32)}, make_mesh(devices=jax.devices()[:1]), 1)
    >>> b["input_ids"].shape
    (2, 4, 8)
    """
    out = {}
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[batch_axis] % n:
            raise ValueError(
                f"batch[{k!r}] axis {batch_axis} has size {v.shape[batch_axis]}, not divisible by data*fsdp={n}; "
                "make the (micro-)batch size a multiple of it"
            )
        out[k] = jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim, batch_axis), lambda idx, v=v: v[idx])
    return out


def to_host(tree: Any) -> Any:
    """Every array of `tree` as a whole numpy array on this process (a collective in a
    multi-process job: every process must call it; shards held elsewhere are gathered).

    >>> from lora_jax.sharding import make_mesh
    >>> mesh = make_mesh(devices=jax.devices()[:1])
    >>> w = load_sharded({"w": np.arange(4.0)}, NamedSharding(mesh, P("fsdp")))
    >>> to_host(w)["w"].tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
