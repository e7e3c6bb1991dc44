"""Adapter-only training checkpoints with orbax: factors + optimizer state + step + LoraConfig.

The frozen base is never written: a checkpoint holds the `trainable` half of
`lora_jax.split(params, config)` (the factors, and any biases / `modules_to_save` the config
trains), the optimizer state of `lora_jax.optimizer`, the step and the `LoraConfig` as JSON.
Saves are asynchronous (training goes on while a background thread writes) and atomic: orbax
writes into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoints loadable. Restores go onto any mesh or device count: give a
`target` whose leaves carry the shardings wanted (arrays, or `jax.ShapeDtypeStruct`s with
`.sharding`, e.g. from `jax.eval_shape` plus `lora_jax.sharding.lora_specs`).

    trainable, frozen = lora_jax.split(params, config)
    opt_state = tx.init(params)
    with AdapterCheckpointer("/ckpt/run1", save_every=500, max_to_keep=3) as ckpt:
        start = 0
        if ckpt.latest_step() is not None:
            start, trainable, opt_state, _ = ckpt.restore(target=(trainable, opt_state))
        for step in range(start + 1, n_steps + 1):
            trainable, opt_state, loss = train_step(trainable, frozen, opt_state, batch(step))
            ckpt.save(step, trainable, opt_state, config)   # writes when step % 500 == 0
        ckpt.save(n_steps, trainable, opt_state, config, force=True)

Every process of a multi-host run calls `save` and `restore` alike (orbax coordinates them);
`directory` must be visible to all of them (a shared file system or a bucket path).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from lora_jax.config import LoraConfig

_FORMAT = "lora_jax.adapter_checkpoint/1"


class Restored(NamedTuple):
    """What `AdapterCheckpointer.restore` returns (unpacks as a 4-tuple)."""

    step: int
    trainable: Any
    opt_state: Any
    config: LoraConfig


class AdapterCheckpointer:
    """Save and restore adapter training state in `directory` (one subdirectory per step).

    - `save_every`: `save(step, ...)` writes only when `step % save_every == 0` (or `force=True`).
    - `max_to_keep`: keep the newest this many complete checkpoints (None keeps all).
    - `async_save`: write in a background thread; `wait()` blocks until writes are done, and
      `close()` (or leaving the `with` block) waits too.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int = 1,
        max_to_keep: int | None = None,
        async_save: bool = True,
    ) -> None:
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
            ),
        )

    def save(self, step: int, trainable: Any, opt_state: Any, config: LoraConfig, *,
             force: bool = False) -> bool:
        """Start writing a checkpoint of `step` if it is due; returns whether one was started.

        `trainable` is the trainable half of `lora_jax.split` (None holes allowed), `opt_state`
        the optimizer state. Returns at once when saving asynchronously; the arrays may be
        donated or overwritten afterwards (orbax copies them off the devices first).
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"save: config must be a LoraConfig, got {type(config).__name__}")
        if (step % self.save_every and not force) or step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(
                    {"format": _FORMAT, "step": step, "lora_config": config.to_dict()}),
            ),
            force=True,  # due-ness is decided above, orbax would also save the first step
        )

    def restore(self, step: int | None = None, *, target: tuple[Any, Any]) -> Restored:
        """(step, trainable, opt_state, config) of `step` (default: the latest complete one).

        `target = (trainable, opt_state)` gives the structure, dtypes and shardings to restore
        onto: arrays or `jax.ShapeDtypeStruct`s carrying `.sharding`, on any mesh, whatever the
        mesh the checkpoint was written from (8 devices -> 4 -> 1). E.g. the freshly initialised
        `split(params, config)[0]` and `tx.init(params)`.
        """
        step = self._resolve_step(step)
        trainable, opt_state = (_abstract(tree, name) for tree, name in
                                zip(target, ("trainable", "opt_state"), strict=True))
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(trainable),
                opt_state=ocp.args.StandardRestore(opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return Restored(step, out.trainable, out.opt_state, _config_of(out.meta, step))

    def config(self, step: int | None = None) -> LoraConfig:
        """The LoraConfig saved with `step` (default: the latest), without reading any array."""
        step = self._resolve_step(step)
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        return _config_of(meta, step)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until every started save is written and committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the background thread."""
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _resolve_step(self, step: int | None) -> int:
        self._manager.reload()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete adapter checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint of step {step} in {self.directory}; steps: {steps}")
        return step


def _abstract(tree: Any, name: str) -> Any:
    """ShapeDtypeStructs with shardings for a target tree of arrays or ShapeDtypeStructs."""

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                f"restore: every leaf of target's {name} needs a sharding (an array, or a "
                f"jax.ShapeDtypeStruct(shape, dtype, sharding=...)); got {x!r}"
            )
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _config_of(meta: Any, step: int) -> LoraConfig:
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"step {step} is not a lora_jax adapter checkpoint (metadata {meta!r})")
    return LoraConfig.from_dict(meta["lora_config"])
