"""Checkpoints of the (sharded) train state: an orbax `CheckpointManager` with two items.

    <directory>/<step>/state/   the train state {"lora", "opt_state", "step", "rng"}, each array
                                written shard by shard by the processes that own it (OCDBT/zarr)
    <directory>/<step>/meta/    a small JSON dict of the caller's (data position, config hash, ...)

Saves are atomic: orbax writes into a temporary directory and renames it when every process has
finished, so a crash mid-save never leaves a step that `latest_step()` would pick up. Only the
newest `max_to_keep` steps are kept. Frozen weights are not saved (they are the base model's).

Restoring takes a *target*: a tree shaped like the state whose leaves are arrays or
`jax.ShapeDtypeStruct`s carrying the shardings to restore onto — these may be on a different mesh
shape (or device count) than the one that saved; each process reads only its shards.
`abstract_state(state, mesh, lora_specs)` builds such a target from any state-shaped tree.

    ckpt = Checkpointer("runs/x/ckpt", max_to_keep=3)
    ckpt.save(int(state["step"]), state, {"data": batches.position, "config_hash": h})
    ...
    target = abstract_state(state_like, new_mesh, lora_specs)   # e.g. jax.eval_shape(init, ...)
    state, meta = ckpt.restore(target=target)                   # latest step by default
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from lora_jax.sharding.rules import named_shardings
from lora_jax.training.step import state_specs

STATE, META = "state", "meta"


def abstract_state(state: Any, mesh: Mesh, lora_specs: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `state` with the shardings it gets on `mesh` (a restore target).

    >>> import jax.numpy as jnp, optax
    >>> from lora_jax.sharding import make_mesh
    >>> from lora_jax.training import init_train_state
    >>> st = init_train_state({"q": {"lora_a": jnp.zeros((4, 2))}}, optax.adam(1e-3), jax.random.key(0))
    >>> t = abstract_state(st, make_mesh(devices=jax.devices()[:1]), {"q": {"lora_a": jax.sharding.PartitionSpec()}})
    >>> t["lora"]["q"]["lora_a"].shape
    (4, 2)
    """
    shardings = named_shardings(state_specs(state, lora_specs), mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
    """Save / restore train states with metadata; keeps the newest `max_to_keep` steps.

    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), max_to_keep=2)
    >>> state = {"lora": {"w": jnp.ones(3)}, "step": jnp.int32(5)}
    >>> ckpt.save(5, state, {"epoch": 1})
    True
    >>> restored, meta = ckpt.restore(target=state)
    >>> ckpt.latest_step(), meta, float(restored["lora"]["w"].sum())
    (5, {'epoch': 1}, 3.0)
    >>> ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, *, async_save: bool = False,
                 save_interval_steps: int = 1):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            save_interval_steps=save_interval_steps,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))

    def save(self, step: int, state: Any, metadata: dict | None = None, *, force: bool = False) -> bool:
        """Write `state` (and the JSON-able `metadata`) as `step`; every process must call it.

        Returns whether a checkpoint was written (False when `save_interval_steps` skips it).
        With `async_save=True` it returns once the arrays are copied off the devices; the write
        finishes in the background (`wait()` blocks on it).
        """
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(metadata or {}))})
        return bool(self._mngr.save(int(step), args=args, force=force))

    def restore(self, step: int | None = None, *, target: Any = None) -> tuple[Any, dict]:
        """(state, metadata) of `step` (default: the latest), placed per `target`'s shardings.

        `target`: arrays or `jax.ShapeDtypeStruct`s (with `sharding=`) shaped like the saved
        state, e.g. `abstract_state(...)` for another mesh; None restores as saved (same topology).
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train first or point at a run's checkpoint directory")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        if target is not None:
            target = jax.tree.map(_as_abstract, target)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()})
        out = self._mngr.restore(step, args=args)
        return out[STATE], dict(out[META] or {})

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, ascending."""
        return sorted(self._mngr.all_steps())

    def wait(self) -> None:
        """Block until a background (async) save has finished."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
