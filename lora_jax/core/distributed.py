"""One script for one host or many: start `jax.distributed`, feed each process's batch shard.

JAX's SPMD runtime does the work: every process runs the same program on a global mesh
(`jax.make_mesh` spans all processes' devices), and each process supplies only the rows of the
global batch that live on its own devices.

    lora_jax.distributed.initialize()                     # no-op on a single process
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    batch = shard_batch(local_rows, mesh)                 # a global [B, ...] jax.Array
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """`jax.distributed.initialize` with what CPU runs need; does nothing for one process.

    With no arguments on a TPU pod or a SLURM / Open MPI / Kubernetes job, JAX finds the
    coordinator itself; elsewhere give all three (every process the same address and count, its
    own `process_id`). Call it first thing, before any other JAX call. On CPU it selects the
    gloo collectives so that cross-process all-reduces work.
    """
    if num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects the CPU
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids)


def batch_sharding(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """Rows (axis 0) split over the mesh axes in `axes` that the mesh has, the rest replicated.

    >>> mesh = jax.make_mesh((1, 1), ("data", "tensor"))
    >>> batch_sharding(mesh).spec  # "tensor" replicates the rows
    P('data',)
    """
    present = tuple(a for a in axes if a in mesh.shape)
    if axes and not present:
        raise ValueError(
            f"none of the batch axes {tuple(axes)} is an axis of the mesh "
            f"{tuple(mesh.axis_names)}; pass axes=... naming the data-parallel mesh axes"
        )
    return NamedSharding(mesh, P(present))


def process_rows(global_rows: int, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> slice:
    """The rows of a global batch that this process feeds to `shard_batch` (all of them on one
    process): those its own devices hold under `batch_sharding(mesh, axes)`.

    >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    >>> rows = 8 * len(jax.devices())
    >>> process_rows(rows, mesh) == slice(0, rows)  # one process feeds every row
    True
    """
    sharding = batch_sharding(mesh, axes)
    _check_divides(global_rows, sharding)
    indices = sharding.addressable_devices_indices_map((global_rows,)).values()
    spans = {(s.start or 0, global_rows if s.stop is None else s.stop)
             for s, *_ in (index for index in indices if index is not None)}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if (hi - lo) * jax.process_count() != global_rows:
        raise ValueError(
            f"this process's devices hold rows {sorted(spans)} of the batch, not one contiguous "
            "block; order the mesh so that each process's devices are adjacent on the batch axes"
        )
    return slice(lo, hi)


def _check_divides(global_rows: int, sharding: NamedSharding) -> None:
    axes = sharding.spec[0]  # P(("data",)) reads back as P("data"): one axis is a str
    axes = (axes,) if isinstance(axes, str) else axes
    n_shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if global_rows % n_shards:
        raise ValueError(
            f"a global batch of {global_rows} rows does not divide over the {n_shards} "
            f"data-parallel devices of mesh axes {tuple(axes)}; use a multiple of {n_shards}"
        )


def shard_batch(local: Any, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> Any:
    """A tree of this process's batch rows -> global arrays sharded over `axes` on axis 0.

    Each process passes the rows `global_batch[process_rows(n, mesh, axes)]` (on one process,
    the whole batch). Raises a ValueError before anything compiles when the global batch does
    not divide over the data-parallel devices.

    >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    >>> rows = 2 * len(jax.devices())
    >>> batch = shard_batch({"ids": np.zeros((rows, 5), np.int32)}, mesh)
    >>> batch["ids"].shape == (rows, 5), batch["ids"].sharding.spec
    (True, P('data',))
    """
    sharding = batch_sharding(mesh, axes)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        _check_divides(x.shape[0] * jax.process_count(), sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local)
