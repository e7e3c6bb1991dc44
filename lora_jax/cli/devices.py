"""Devices and hosts of `lora-jax finetune`: `--mesh` (axes `data`, `fsdp`, `tensor`),
`jax.distributed` from the flags or the environment, and where params, optimizer state and
batches live on the mesh (docs/guides/cli.md, "Devices and hosts").

    start_processes(None, None, None)            # before any other JAX call; one host: no-op
    placement = Placement.of(parse_mesh("data=2,fsdp=4"), batch_size=16)
    params = placement.place(params, placement.shardings(params))   # the base and factors
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

MESH_AXES = ("data", "fsdp", "tensor")
Sizes = tuple[tuple[str, int], ...]


def parse_mesh(text: str) -> Sizes:
    """The `--mesh` flag's axis sizes (axes from `MESH_AXES`); a bad one is an argparse error.

    >>> parse_mesh("data=2,fsdp=4")
    (('data', 2), ('fsdp', 4))
    """
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise argparse.ArgumentTypeError(
                f"unknown mesh axis {name!r} in {text!r}: use {', '.join(MESH_AXES)}, e.g. "
                "data=2,fsdp=4")
        if name in sizes:
            raise argparse.ArgumentTypeError(f"mesh axis {name!r} is given twice in {text!r}")
        if not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r}: a mesh axis size is a "
                                             "positive integer, e.g. data=2,fsdp=4")
        sizes[name] = int(value)
    return tuple(sizes.items())


def mesh_text(sizes: Sizes) -> str:
    """`(("data", 2), ("fsdp", 4))` -> `data=2,fsdp=4` (as `--mesh` takes it)."""
    return ",".join(f"{name}={n}" for name, n in sizes)


def start_processes(coordinator: str | None, num_processes: int | None,
                    process_id: int | None) -> None:
    """Start `jax.distributed` for a run of several processes: from the three flags (all
    needed) or the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or
    a SLURM / Open MPI job of several tasks); a no-op for one process or once started."""
    import jax

    from lora_jax.core import distributed

    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if jax.distributed.is_initialized() or num_processes == 1:
        return
    if any(v is not None for v in given.values()):
        missing = [flag for flag, v in given.items() if v is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} missing: a multi-process run needs "
                             "--coordinator HOST:PORT, --num-processes and --process-id")
        assert num_processes is not None and process_id is not None
        if process_id >= num_processes:
            raise ValueError(f"--process-id {process_id} is not below --num-processes "
                             f"{num_processes}: number the processes 0 to {num_processes - 1}")
        args: tuple[Any, ...] = (coordinator, num_processes, process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        args = (None, int(count) if count else None, int(index) if index else None)
    elif max(int(os.environ.get(v) or 1) for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")) > 1:
        args = (None, None, None)
    else:
        return
    try:
        distributed.initialize(*args)
    except Exception as err:  # JAX raises RuntimeError / XlaRuntimeError, often many lines
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--coordinator {coordinator or os.environ.get('JAX_COORDINATOR_ADDRESS')}"
                         f": cannot start the {num_processes or ''} processes ({reason})"
                         ) from None


@dataclasses.dataclass(frozen=True)
class Placement:
    """A finetune run's mesh, and how its arrays and batches are laid out on it."""

    mesh: Any  # jax.sharding.Mesh

    @classmethod
    def of(cls, sizes: Sizes | None, batch_size: int) -> Placement:
        """The mesh of `--mesh` (None: data-parallel over every device, or on one process over
        the most devices whose count divides `batch_size`), checked against the devices and the
        global batch: each problem is a ValueError naming the flag."""
        import jax
        from jax.sharding import AxisType

        n, multi = jax.device_count(), jax.process_count() > 1
        if sizes is None:
            data = n if multi else max(d for d in range(1, n + 1)
                                       if n % d == 0 and batch_size % d == 0)
            sizes = (("data", data),)
        shown = f"--mesh {mesh_text(sizes)}"
        used = math.prod(size for _, size in sizes)
        if used != n and (multi or n % used):
            need = f"is {n}" if multi else f"divides {n}"
            where = f" in {jax.process_count()} processes" if multi else ""
            raise ValueError(f"{shown} uses {used} devices; there are {n}{where}: give sizes "
                             f"whose product {need}")
        parallel = math.prod(size for name, size in sizes if name in ("data", "fsdp"))
        if batch_size % parallel:
            raise ValueError(f"--batch-size {batch_size} does not divide over the {parallel} "
                             f"batch devices of {shown} (data x fsdp): use a multiple of "
                             f"{parallel}")
        shape = tuple(dict(sizes).get(name, 1) for name in MESH_AXES)
        mesh = jax.make_mesh(shape, MESH_AXES, devices=jax.devices()[:used],
                             axis_types=(AxisType.Auto,) * len(MESH_AXES))
        return cls(mesh)

    @property
    def sizes(self) -> Sizes:
        """The mesh's axes of more than one device (one device: `data=1`)."""
        sizes = tuple((name, int(n)) for name, n in self.mesh.shape.items() if n > 1)
        return sizes or (("data", 1),)

    def shardings(self, params: Mapping[str, Any], rules: Any = None, model: str = "model"
                  ) -> Any:
        """`NamedSharding`s for injected `params`: fsdp on the base's largest dividing axes, or
        with a `tensor` axis the architecture's `(regex, spec)` `rules` (written for scanned
        layers: an unscanned weight takes the spec's trailing entries); the factors follow
        their weights. A mesh the weights do not divide over is a ValueError naming --mesh."""
        import jax
        from jax.sharding import PartitionSpec as P

        from lora_jax.core.sharding import fsdp_specs, lora_specs, match_specs, named_shardings

        shown = f"--mesh {mesh_text(self.sizes)}"
        fsdp, tensor = int(self.mesh.shape["fsdp"]), int(self.mesh.shape["tensor"])
        if tensor == 1:
            base = fsdp_specs(params, fsdp)
        elif rules is None:
            raise ValueError(f"{shown}: a {model} has no tensor-parallel rules; use data and "
                             "fsdp")
        else:
            base = _trailing(match_specs(params, rules), params)
        specs = lora_specs(params, base)
        if fsdp > 1 and not any("fsdp" in spec for spec in jax.tree.leaves(
                specs, is_leaf=lambda x: isinstance(x, P))):
            raise ValueError(f"{shown}: no weight of the model has an axis that divides over "
                             f"{fsdp} devices; use a smaller fsdp")
        try:
            return named_shardings(specs, self.mesh, params)
        except ValueError as err:
            raise ValueError(f"{shown}: {err}") from None

    def place(self, tree: Any, shardings: Any) -> Any:
        """`tree` (the same on every process) on the mesh, each process writing its shards."""
        import jax
        import numpy as np

        def put(x: Any, sharding: Any) -> Any:
            if isinstance(x, jax.Array) and x.sharding == sharding:
                return x
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

        return jax.tree.map(put, tree, shardings)

    def opt_state(self, tx: Any, trainable: Any, trainable_shardings: Any) -> Any:
        """`tx.init(trainable)` created on the mesh, Adam's moments sharded as the factors."""
        import jax

        from lora_jax.core.sharding import named_shardings, opt_state_specs

        specs = opt_state_specs(jax.eval_shape(tx.init, trainable),
                                jax.tree.map(lambda s: s.spec, trainable_shardings))
        return jax.jit(tx.init, out_shardings=named_shardings(specs, self.mesh))(trainable)

    def step(self, step: Any, trainable_shardings: Any, opt_shardings: Any) -> Any:
        """A `train_step` jitted to keep the trainable half and optimizer state where they are
        (both donated); the loss comes back replicated."""
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        return jax.jit(step, out_shardings=(trainable_shardings, opt_shardings,
                                            NamedSharding(self.mesh, P())),
                       donate_argnums=(0, 2))

    def feed(self, arrays: Mapping[str, Any], index: Any) -> dict[str, Any]:
        """The global batch of rows `index` of `arrays`: this process reads only its own rows
        and puts them on its devices."""
        rows = self.rows(len(index))
        return self.shard({k: v[index[rows]] for k, v in arrays.items()})

    def rows(self, global_rows: int) -> slice:
        """This process's rows of a global batch of `global_rows` (all of them on one process)."""
        from lora_jax.core import distributed

        return distributed.process_rows(global_rows, self.mesh)

    def shard(self, local: Mapping[str, Any]) -> dict[str, Any]:
        """The global batch of which this process holds `local`, its `rows`, on the mesh."""
        from lora_jax.core import distributed

        return distributed.shard_batch(dict(local), self.mesh)

    def eval_batch(self, size: int) -> int:
        """`size` rounded up to a multiple of the batch devices (data x fsdp)."""
        devices = int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        return -(-size // devices) * devices


def _trailing(specs: Any, params: Any) -> Any:
    """Each spec cut to its leaf's rank from the front (a scanned layer axis's entry dropped)."""
    import flax.linen as nn
    import jax
    from jax.sharding import PartitionSpec as P

    def cut(spec: Any, leaf: Any) -> Any:
        return P(*spec[len(spec) - leaf.ndim:]) if len(spec) > leaf.ndim else spec

    return jax.tree.map(cut, specs, nn.unbox(params), is_leaf=lambda x: isinstance(x, P))

