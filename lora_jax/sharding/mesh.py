"""The device mesh: `MeshConfig(data, fsdp, tensor)`, `make_mesh`, `initialize_distributed`.

Three named axes, always in this order, so partition rules and batch specs can name them whatever
the mesh shape (an axis of size 1 simply does nothing):

    'data'    pure data parallelism: params replicated, batch split.
    'fsdp'    ZeRO-3 / FSDP: params, gradients and optimizer state split over it, and the batch
              too (XLA all-gathers each weight just before use and reduce-scatters its gradient).
    'tensor'  Megatron tensor parallelism: column-parallel q/k/v/gate/up, row-parallel o/down.

The mesh uses `AxisType.Auto` axes: shardings are given at the jit boundary (in/out_shardings)
and GSPMD propagates them through the model, so model code needs no sharding annotations.

Multi-host: call `initialize_distributed()` first on every process (a no-op for one process); the
mesh then spans every process's devices (`jax.devices()`), ordered so that 'tensor' (the most
communication-heavy axis) stays inside a host.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch axis is split over both


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ('data', 'fsdp', 'tensor') axes; one of them may be -1 = all remaining devices.

    >>> MeshConfig(data=2, fsdp=-1).resolve(8)
    (2, 4, 1)
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        for name, n in zip(AXES, sizes):
            if isinstance(n, bool) or not isinstance(n, int) or (n < 1 and n != -1):
                raise ValueError(f"MeshConfig.{name} must be a positive integer or -1 (the rest), got {n!r}")
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1 (the rest), got {self}")

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) sizes for `n_devices`; ValueError if they do not fit."""
        sizes = [self.data, self.fsdp, self.tensor]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % fixed:
                raise ValueError(
                    f"MeshConfig{tuple(sizes)}: the fixed axes ({fixed} devices) do not divide the {n_devices} devices; "
                    "choose axis sizes whose product divides the device count"
                )
            sizes[sizes.index(-1)] = n_devices // fixed
        elif fixed != n_devices:
            raise ValueError(
                f"MeshConfig{tuple(sizes)} needs {fixed} devices but {n_devices} are available; "
                "make data*fsdp*tensor equal the device count or set one axis to -1"
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    >>> mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolve(len(devices))
    grid = None
    if devices[0].platform != "cpu":  # TPU/GPU: follow the physical interconnect topology
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001 - unusual topologies: fall back to the plain order below
            grid = None
    if grid is None:
        # Process-major device order: consecutive devices (the 'tensor' axis, then 'fsdp') share a
        # host, so the chattiest collectives stay on the fastest links.
        devices.sort(key=lambda d: (d.process_index, d.id))
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
) -> bool:
    """Join a multi-process JAX job; a no-op (returns False) for a single process.

    Arguments default to the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID` (also torchrun-style `MASTER_ADDR`:`MASTER_PORT`, `WORLD_SIZE`, `RANK`).
    On clusters JAX detects by itself (TPU pods, SLURM, Open MPI) call it with no arguments and no
    env vars set: `jax.distributed.initialize()` auto-detects them. On CPU, cross-process
    collectives use `cpu_collectives` ('gloo'), which must be chosen before initialization.
    Returns True when it initialized a multi-process job. Call it before any other JAX call.

    >>> initialize_distributed(num_processes=1)
    False
    """
    env = os.environ
    if coordinator_address is None:
        coordinator_address = env.get("JAX_COORDINATOR_ADDRESS")
        if coordinator_address is None and "MASTER_ADDR" in env:
            coordinator_address = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '1234')}"
    if num_processes is None:
        n = env.get("JAX_NUM_PROCESSES", env.get("WORLD_SIZE"))
        num_processes = int(n) if n is not None else None
    if process_id is None:
        r = env.get("JAX_PROCESS_ID", env.get("RANK"))
        process_id = int(r) if r is not None else None
    auto_cluster = any(k in env for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
    if num_processes == 1 or (num_processes is None and coordinator_address is None and not auto_cluster):
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError(
            f"initialize_distributed: coordinator {coordinator_address!r} given but num_processes={num_processes} / "
            f"process_id={process_id}; pass both (or set JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True
