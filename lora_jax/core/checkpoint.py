"""Adapter-only training checkpoints with orbax: factors + optimizer state + step + config.

A checkpoint holds the `trainable` half of `lora_jax.split(params, config)` (never the frozen
base), the optimizer state, the step and the adapter's config as JSON. Saves are asynchronous and
atomic (orbax renames a finished temporary directory: a process killed mid-save leaves the
previous checkpoints loadable); restores go onto any mesh, by the shardings of `target`'s leaves.
Every process of a multi-host run calls `save` and `restore` alike; `directory` must be visible
to all of them. Each step's metadata holds a SHA-256 digest of its arrays (when all are
addressable from this process), which `restore` checks, and any `extra` JSON given to `save`.
A training loop that resumes: docs/guides/sharding.md, "Checkpoints".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax import variants
from lora_jax.core.config import AdapterConfig, is_number

_FORMAT = "lora_jax.adapter_checkpoint/1"


class CorruptCheckpoint(ValueError):
    """A checkpoint step that cannot be read back, or whose arrays fail their digest."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a read-only folder): the steps
    committed before it are intact."""


def _unretrieved_write_failure(record: logging.LogRecord) -> bool:
    """False for asyncio's "exception was never retrieved" report of an orbax write task: once a
    save failed, each abandoned write task repeats the failure `CheckpointWriteError` reported."""
    return "exception was never retrieved" not in record.getMessage()


class CheckpointMismatch(ValueError):
    """A checkpoint step whose arrays differ in structure or shape from the restore target: the
    run's settings changed since it was saved, not its files."""


class Restored(NamedTuple):
    """What `AdapterCheckpointer.restore` returns (unpacks as a 4-tuple)."""

    step: int
    trainable: Any
    opt_state: Any
    config: AdapterConfig


class AdapterCheckpointer:
    """Save and restore adapter training state in `directory` (one subdirectory per step).

    - `save_every`: `save(step, ...)` writes only when `step % save_every == 0` (or `force=True`).
    - `max_to_keep`: keep the newest this many complete checkpoints (None keeps all).
    - `async_save`: write in a background thread; `wait()` blocks until writes are done, and
      `close()` (or leaving the `with` block) waits too.

    >>> import tempfile, flax.linen as nn, jax, jax.numpy as jnp, optax, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*")
    >>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
    ...                          jax.random.key(1))
    >>> trainable, frozen = lora_jax.split(params, config)
    >>> opt_state = optax.adam(1e-3).init(trainable)
    >>> with tempfile.TemporaryDirectory() as tmp, AdapterCheckpointer(tmp) as ckpt:
    ...     ckpt.save(1, trainable, opt_state, config)
    ...     ckpt.wait()
    ...     step, restored, _, saved = ckpt.restore(target=(trainable, opt_state))
    True
    >>> step, saved == config, bool(jnp.array_equal(restored["lora_A"], trainable["lora_A"]))
    (1, True, True)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int = 1,
        max_to_keep: int | None = None,
        async_save: bool = True,
    ) -> None:
        if not is_number(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be a positive integer, got {save_every!r}")
        if max_to_keep is not None and (not is_number(max_to_keep, int) or max_to_keep < 1):
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

    def save(self, step: int, trainable: Any, opt_state: Any, config: AdapterConfig, *,
             force: bool = False, extra: Any = None) -> bool:
        """Start writing a checkpoint of `step` if it is due; returns whether one was started.

        `trainable` is the trainable half of `lora_jax.split` (None holes allowed), `opt_state`
        the optimizer state. Returns at once when saving asynchronously; the arrays may be
        donated or overwritten afterwards (orbax copies them off the devices first). `extra`
        (JSON-serialisable, finite numbers only) is stored in the step's metadata; read it back
        with `extra(step)`.
        """
        if not isinstance(config, AdapterConfig):
            known = sorted({v.config.__name__ for v in variants.registered()})
            raise TypeError(f"save: config must be an adapter config ({', '.join(known)}), "
                            f"got {type(config).__name__}")
        if (step % self.save_every and not force) or step in self._manager.all_steps():
            return False
        meta = {"format": _FORMAT, "step": step, "lora_config": config.to_dict(),
                "variant": variants.for_config(config).name,
                "digest": _digest((trainable, opt_state)), "extra": extra}
        json.dumps(meta, allow_nan=False)  # NaN / inf would be invalid JSON: refuse up front
        with self._writing():
            return self._manager.save(
                step,
                args=ocp.args.Composite(
                    trainable=ocp.args.StandardSave(trainable),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,  # due-ness is decided above, orbax would also save the first step
            )

    def restore(self, step: int | None = None, *, target: tuple[Any, Any]) -> Restored:
        """(step, trainable, opt_state, config) of `step` (default: the latest complete one).

        `target = (trainable, opt_state)` gives the structure, dtypes and shardings to restore
        onto (arrays, or `jax.ShapeDtypeStruct`s carrying `.sharding`), on any mesh (8 devices
        -> 4 -> 1): e.g. the freshly initialised `split(params, config)[0]` and `tx.init` of it.
        Missing or damaged files, or arrays that fail their digest, raise `CorruptCheckpoint`
        naming the step's folder; arrays of other paths or shapes than the target's raise
        `CheckpointMismatch` (checked from the metadata, before any array is read).
        """
        step = self._resolve_step(step)
        wanted = tuple(_abstract(tree, name) for tree, name in
                       zip(target, ("trainable", "opt_state"), strict=True))
        where = os.path.join(self.directory, str(step))
        meta = self._meta(step)
        config = _config_of(meta, where)
        saved_digest = meta.get("digest")
        if saved_digest is not None and (
                difference := _difference(saved_digest["signature"], _signature(wanted))):
            raise CheckpointMismatch(f"checkpoint {where} does not fit the restore target: "
                                     f"{difference}")
        # Read the arrays in the dtypes they were saved in, so the digest can be checked, and
        # cast them to the target's afterwards (orbax would cast first).
        trainable, opt_state = _as_saved(wanted, saved_digest)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    trainable=ocp.args.StandardRestore(trainable),
                    opt_state=ocp.args.StandardRestore(opt_state),
                ),
            )
        except Exception as err:  # orbax / tensorstore raise many kinds on damaged files
            raise CorruptCheckpoint(f"checkpoint {where} cannot be read: "
                                    f"{_one_line(err)}") from err
        restored = (out.trainable, out.opt_state)
        if (saved_digest is not None and _signature(restored) == saved_digest["signature"]
                and _digest(restored) != saved_digest):
            raise CorruptCheckpoint(f"checkpoint {where}: the arrays do not match the digest "
                                    "written with them (damaged files)")
        trainable, opt_state = jax.tree.map(
            lambda x, want: x.astype(want.dtype) if x.dtype != want.dtype else x, restored, wanted)
        return Restored(step, trainable, opt_state, config)

    def restore_intact(self, *, target: tuple[Any, Any]
                       ) -> tuple[Restored, list[tuple[int, str]]]:
        """`restore` of the newest step that reads back and verifies, and the (step, reason) of
        each newer step skipped. Skipped steps are moved to `<directory>.unreadable/<step>` (kept
        for inspection; a later save of the same step number can then be written).
        Raises `CorruptCheckpoint` when no step is intact, FileNotFoundError when there is none,
        `CheckpointMismatch` (at once, nothing moved) when the target does not fit the steps.
        """
        self._resolve_step(None)  # FileNotFoundError when there is no step
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, target=target)
            except CheckpointMismatch:
                raise  # the target, not this step: every other step would differ alike
            except (CorruptCheckpoint, ValueError) as err:
                skipped.append((step, str(err)))
                continue
            for bad, _ in skipped:
                self._set_aside(bad)
            return restored, skipped
        reasons = "; ".join(reason for _, reason in skipped)
        raise CorruptCheckpoint(f"no intact checkpoint in {self.directory}: {reasons}")

    def config(self, step: int | None = None) -> AdapterConfig:
        """The config saved with `step` (default: the latest), without reading any array."""
        step = self._resolve_step(step)
        return _config_of(self._meta(step), os.path.join(self.directory, str(step)))

    def extra(self, step: int | None = None) -> Any:
        """The `extra` JSON saved with `step` (default: the latest); None if none was given."""
        step = self._resolve_step(step)
        return self._meta(step).get("extra")

    def _meta(self, step: int) -> dict[str, Any]:
        """The step's metadata JSON, read directly (a clear error naming a damaged file)."""
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {path} is missing") from None
        except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
            raise CorruptCheckpoint(f"checkpoint {path} is not valid JSON: "
                                    f"{_one_line(err)}") from None
        if not isinstance(meta, dict):
            raise CorruptCheckpoint(f"checkpoint {path} is not a JSON object")
        return meta

    def _set_aside(self, step: int) -> None:
        aside = self.directory.rstrip(os.sep) + ".unreadable"
        os.makedirs(aside, exist_ok=True)
        dest, n = os.path.join(aside, str(step)), 1
        while os.path.exists(dest):
            dest, n = os.path.join(aside, f"{step}-{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(step)), dest)
        self._manager.reload()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until every started save is written and committed; a save that failed raises
        `CheckpointWriteError` (an OSError with the system's errno where orbax gives one)."""
        with self._writing():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the background thread."""
        with self._writing():
            self._manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, kind: type | None, *exc_info: object) -> None:
        if kind is None:
            self.close()
        else:  # the error under way is the one to report, not the same failure again
            with contextlib.suppress(Exception):
                self.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Orbax's failures to write (raised here, or from a background save) as one
        `CheckpointWriteError` naming the directory and the system's reason."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as err:
            code = getattr(err, "errno", None)
            found = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", str(err))
            if found:
                code = int(next(g for g in found.groups() if g))
            reason = os.strerror(code) if code else _one_line(err)
            logging.getLogger("asyncio").addFilter(_unretrieved_write_failure)
            raise CheckpointWriteError(code, f"cannot write a checkpoint in {self.directory}: "
                                             f"{reason}") from err

    def _resolve_step(self, step: int | None) -> int:
        """`step` (None: the latest) checked against the steps on disk, reloaded."""
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


def _difference(saved: list[list[Any]], wanted: list[list[Any]]) -> str | None:
    """The first array path whose shape differs between two signatures, or that only one of
    them has (dtypes may differ: restore casts); None when they agree."""
    shapes = [{path: tuple(shape) for path, _, shape in signature}
              for signature in (saved, wanted)]
    for path in sorted(shapes[0].keys() | shapes[1].keys()):
        got, want = (s.get(path) for s in shapes)
        if got != want:
            return (f"{path} is {'absent' if got is None else got} in the checkpoint, "
                    f"{'absent' if want is None else want} in the target")
    return None


def _as_saved(target: Any, digest: dict[str, Any] | None) -> Any:
    """`target` (ShapeDtypeStructs) with each array's dtype as the digest's signature records
    it, where the path and shape agree (the rest is left for orbax to refuse or cast)."""
    saved = {path: (dtype, tuple(shape)) for path, dtype, shape in
             (digest or {}).get("signature", [])}

    def leaf(path: Any, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        dtype, shape = saved.get(jax.tree_util.keystr(path), (None, None))
        if dtype is None or shape != tuple(x.shape) or np.dtype(dtype) == x.dtype:
            return x
        return jax.ShapeDtypeStruct(x.shape, np.dtype(dtype), sharding=x.sharding)

    return jax.tree_util.tree_map_with_path(leaf, target)


def _config_of(meta: Any, where: str) -> AdapterConfig:
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CorruptCheckpoint(f"checkpoint {where} is not a lora_jax adapter checkpoint "
                                f"(metadata {str(meta)[:200]})")
    try:
        # Its variant's config class (checkpoints before VeRA / LoKr hold LoRA's).
        config_class: type[AdapterConfig] = variants.named(meta.get("variant", "lora")).config
        return config_class.from_dict(meta["lora_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {where}: bad lora_config in its metadata: "
                                f"{_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + " ...") if len(text) > 300 else text or type(err).__name__


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def _signature(tree: Any) -> list[list[Any]]:
    """Path, dtype and shape of every array leaf (what the digest covers)."""
    return [[path, str(np.dtype(leaf.dtype)), list(leaf.shape)] for path, leaf in _leaves(tree)
            if hasattr(leaf, "dtype")]


def _digest(tree: Any) -> dict[str, Any] | None:
    """SHA-256 over every array leaf's path, dtype, shape and bytes; None when some leaf is not
    fully addressable from this process (a multi-host shard: the digest is then skipped)."""
    h = hashlib.sha256()
    for path, leaf in _leaves(tree):
        if not hasattr(leaf, "dtype"):
            continue
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        value = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{path}|{value.dtype}|{value.shape}|".encode())
        h.update(value.tobytes())
    return {"sha256": h.hexdigest(), "signature": _signature(tree)}
