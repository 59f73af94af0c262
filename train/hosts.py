"""Multi-process runs: joining the job, who writes, agreeing on when to stop, gathering for export.

`lora-jax train` runs unchanged as N processes (one per host, or per GPU group): each process
runs the same program on the same recipe, reads the same data and feeds the same global batch
(`lora_jax.sharding.shard_batch` places only its own devices' slices). What differs:

* `initialize(recipe.distributed)` joins the job before any other JAX call: from the recipe's
  `distributed:` section, else the usual environment variables (`JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; torchrun's `MASTER_ADDR`/`WORLD_SIZE`/`RANK`), else what
  `jax.distributed` detects by itself (SLURM, Open MPI, TPU pods). One process: nothing to do.
* `is_main()`: process 0 alone writes run.json, recipe.yaml, logs, tensorboard, samples and the
  exported adapter; orbax checkpoints are written by every process (each its own shards).
* `agree(flag)`: a stop decision (a signal that reached one process, a diverging loss) taken by
  all processes at the same step, so none waits forever in a collective the others left.
* `lora_jax.sharding.to_host` gathers arrays that are not fully addressable for export.

>>> is_main(), agree(False), agree(True)
(True, False, True)
"""

from __future__ import annotations

import numpy as np


def initialize(section=None) -> bool:
    """Join the multi-process job the recipe / environment describe; False for a single process.

    A coordinator given explicitly with one process makes a 1-process `jax.distributed` job: its
    cross-device sums then run through the same CPU collectives (gloo) as a multi-process job's,
    so it reproduces an N-process run bit for bit (plain single-process XLA sums in another order).
    """
    import os

    from lora_jax.sharding import initialize_distributed

    s = section
    addr = getattr(s, "coordinator_address", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = getattr(s, "num_processes", None) or os.environ.get("JAX_NUM_PROCESSES")
    if addr and n is not None and int(n) == 1:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(addr, 1, 0)
        return True
    return initialize_distributed(getattr(s, "coordinator_address", None), getattr(s, "num_processes", None),
                                  getattr(s, "process_id", None))


def is_main() -> bool:
    """Whether this process writes the run's files (process 0)."""
    import jax

    return jax.process_index() == 0


def agree(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a no-op for one process)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def barrier(name: str) -> None:
    """Wait until every process reaches this point (a no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
