"""Adapter sets: many LoRA adapters over one frozen base, as data (docs/guides/many_adapters.md).

An `AdapterSet` keeps the base once and K adapters beside each adapted weight: the factors gain
an adapter axis right after the weight's stacked axes (so `nn.scan` slices them with their
layer), padded with zeros to the set's largest rank, and the scale becomes an array `[*stacked,
K]` (0 where an adapter does not adapt the weight). Selecting, disabling or swapping in another
adapter of the same shapes changes array values only, so a jitted function never recompiles.
Through `lora_jax.wrap(model.apply, config)`, `select(set.params, index)` runs one adapter for
the whole call (-1: the base alone, e.g. a DPO reference), and `apply(variables, x,
adapter_ids=ids)` a mixed batch, one adapter id per example (-1: none), equal to running each
example with its own adapter.

>>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
>>> model, x = nn.Dense(4), jnp.ones((3, 5))
>>> base = model.init(jax.random.key(0), x)["params"]
>>> def adapter(r, seed):
...     config = lora_jax.LoraConfig(r=r, target_modules=".*", init_lora_weights=False)
...     return lora_jax.inject(base, config, jax.random.key(seed)), config
>>> aset = adapter_set({"a": adapter(2, 1), "b": adapter(4, 2)})
>>> aset.params["lora_A"].shape  # [K, in, max r]
(2, 5, 4)
>>> apply = lora_jax.wrap(model.apply, aset.configs[0])
>>> mixed = apply({"params": aset.params}, x, adapter_ids=aset.ids(["a", "b", None]))
>>> alone = apply({"params": select(aset.params, aset.index("b"))}, x)
>>> bool(jnp.allclose(mixed[1], alone[1], atol=1e-6))
True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import variants
from lora_jax.core.config import AdapterConfig
from lora_jax.core.record import (
    Adapted,
    LoraRecord,
    check_same_base,
    leading,
    record_name,
    records,
    scale_name,
    without_adapters,
)
from lora_jax.core.targets import unbox, with_leaves, without_leaves
from lora_jax.peft.files import load_peft, save_peft

Key = tuple[str, str]  # (module path, weight name)


@dataclasses.dataclass(frozen=True)
class AdapterSet:
    """K named adapters over one base. `params` is the tree to pass to `jax.jit` / `wrap`;
    `names`, `configs` and `records` (each adapter's own records: true rank and scale) stay
    on the host, so that saving or extracting an adapter gives back exactly what went in."""

    params: dict[str, Any]
    names: tuple[str, ...]
    configs: tuple[AdapterConfig, ...]
    records: tuple[Mapping[Key, LoraRecord], ...]

    def index(self, name: str | None) -> int:
        """The slot of adapter `name` (None: -1, the base alone)."""
        if name is None:
            return -1
        if name not in self.names:
            raise ValueError(f"no adapter named {name!r} in this set; it holds "
                             f"{list(self.names)}")
        return self.names.index(name)

    def ids(self, names: Sequence[str | None]) -> jax.Array:
        """Per-example adapter ids (int32) for a mixed batch; None means no adapter."""
        return jnp.asarray([self.index(n) for n in names], jnp.int32)


def _by_weight(tree: Mapping[str, Any]) -> dict[Key, Adapted]:
    """The adapted weights of a params tree by (module path, weight name)."""
    return {(i.path, i.record.weight): i for i in records(tree)}


def _full_scale(item: Adapted) -> jax.Array:
    """The item's scale as an array over its stacked axes."""
    stacked = np.shape(unbox(item.weight))[:item.record.layout.stacked]
    return jnp.broadcast_to(jnp.asarray(item.scale, jnp.float32), stacked)


def _own_leaves(own: LoraRecord, leaves: Mapping[str, Any]) -> dict[str, Any]:
    """One adapter's leaves (by leaf name) cut back to its own rank, with its own record."""
    resized = variants.of(own).resize(leaves, leading(own), own.rank)
    return {**{own.keys[n]: v for n, v in resized.items()}, record_name(own.weight): own}


def adapter_set(adapters: Mapping[str, tuple[Mapping[str, Any], AdapterConfig]]) -> AdapterSet:
    """An `AdapterSet` from `{name: (params, config)}`, each params tree one adapter over the
    same base (from `inject` or `load_peft`). Ranks and targets may differ.

    Raises if an adapter is over another base, trains leaves other than factors, is DoRA (no
    mixed-batch form, as in peft), or is itself a set.
    """
    if not adapters:
        raise ValueError("adapter_set needs at least one adapter")
    names = tuple(adapters)
    trees = [adapters[n][0] for n in names]
    found: list[dict[Key, Adapted]] = []
    for name, tree in zip(names, trees, strict=True):
        items = _by_weight(tree)
        for item in items.values():
            variants.of(item.record).check("adapter_sets", f"adapter {name!r}: {item.target!r}")
            if item.record.adapters or item.record.materialised:
                what = "already a set" if item.record.adapters else "materialised (no rule)"
                raise ValueError(f"adapter {name!r}: {item.target!r} is {what}; adapter sets "
                                 "hold adapters of ruled layers")
        if found:
            check_same_base(trees[0], tree, f"adapter {name!r}")
        found.append(items)
    updates: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(k for items in found for k in items):
        members = [items.get(key) for items in found]
        first = next(m for m in members if m is not None)
        record = first.record
        if any(m is not None and m.record.layout != record.layout for m in members):
            raise ValueError(f"{first.target!r} is read with different layouts by the "
                             "adapters; inject them with the same layouts")
        rank = max(m.record.rank for m in members if m is not None)
        stacked, variant = record.layout.stacked, variants.of(record)
        own = {id(m): variant.resize(m.leaves, leading(record), rank)
               for m in members if m is not None}
        absent = {n: jnp.zeros_like(v) for n, v in own[id(first)].items()}
        leaves = [absent if m is None else own[id(m)] for m in members]
        scales = [jnp.zeros_like(_full_scale(first)) if m is None else _full_scale(m)
                  for m in members]
        dtype = jnp.result_type(*(v for arrays in leaves for v in arrays.values()))
        record = dataclasses.replace(record, rank=rank, scale=None, layers=None, ranks=None,
                                     adapters=len(names))
        updates.setdefault(first.path, {}).update({
            **{record.keys[n]: jnp.stack([arrays[n] for arrays in leaves], stacked).astype(dtype)
               for n in absent},
            scale_name(record.weight): jnp.stack(scales, stacked),
            record_name(record.weight): record,
        })
    base = without_adapters(trees[0])
    return AdapterSet(
        with_leaves(base, updates), names, tuple(adapters[n][1] for n in names),
        tuple({k: i.record for k, i in items.items()} for items in found))


def select(params: Mapping[str, Any], index: int | jax.Array) -> dict[str, Any]:
    """The set's params with one adapter for every example: slot `index` (-1: the base alone).

    A pure function of traced values: inside `jax.jit` another index reuses the compiled
    function. The result has the set's (padded) rank and an array scale. A concrete index
    outside -1..K-1 raises; under `jit` (value unknown when tracing) it gives the base alone.
    """
    index = jnp.asarray(index, jnp.int32)
    updates: dict[str, dict[str, Any]] = {}
    for item in records(params):
        record = item.record
        if not record.adapters:
            continue
        if not isinstance(index, jax.core.Tracer) and not -1 <= int(index) < record.adapters:
            raise ValueError(f"select: index {int(index)} is not a slot of this set of "
                             f"{record.adapters} adapters (0..{record.adapters - 1}, or -1 for "
                             "the base alone)")
        axis = record.layout.stacked
        slot = jnp.clip(index, 0, record.adapters - 1)
        on = (index >= 0) & (index < record.adapters)
        scale = jnp.take(item.scale, slot, axis=axis) * on
        updates.setdefault(item.path, {}).update({
            **{key: jnp.take(item.module[key], slot, axis=axis) for key in record.arrays},
            scale_name(record.weight): scale,
            record_name(record.weight): dataclasses.replace(record, adapters=0),
        })
    if not updates:
        raise ValueError("select: these params hold no adapter set (lora_jax.adapters."
                         "adapter_set builds one)")
    return with_leaves(params, updates)


def adapter(aset: AdapterSet, name: str) -> tuple[dict[str, Any], AdapterConfig]:
    """(params, config) of one adapter of the set, exactly as it went in (own ranks, targets
    and scales): for `merge`, `save_peft` or training it alone.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    >>> a, b = (lora_jax.inject(base, config, jax.random.key(seed)) for seed in (1, 2))
    >>> params, own_config = adapter(adapter_set({"a": (a, config), "b": (b, config)}), "b")
    >>> bool(jnp.array_equal(params["lora_B"], b["lora_B"])), own_config == config
    (True, True)
    """
    k = aset.index(name)
    own = aset.records[k]
    updates: dict[str, dict[str, Any]] = {}
    drop: set[tuple[str, str]] = set()
    for key, item in _by_weight(aset.params).items():
        drop.update((item.path, n) for n in item.record.leaves)
        if key not in own:
            continue
        mine, axis = own[key], item.record.layout.stacked
        leaves = _own_leaves(mine, {n: jnp.take(v, k, axis=axis) for n, v in item.leaves.items()})
        if mine.scale is None:
            leaves[scale_name(mine.weight)] = jnp.take(item.scale, k, axis=axis)
        updates.setdefault(item.path, {}).update(leaves)
    params = without_leaves(aset.params, drop)
    return with_leaves(params, updates), aset.configs[k]


def add(aset: AdapterSet, name: str, params: Mapping[str, Any],
        config: AdapterConfig) -> AdapterSet:
    """The set with adapter `name` added (K grows: a jitted function recompiles once).

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    >>> a, b = (lora_jax.inject(base, config, jax.random.key(seed)) for seed in (1, 2))
    >>> add(adapter_set({"a": (a, config)}), "b", b, config).names
    ('a', 'b')
    """
    if name in aset.names:
        raise ValueError(f"the set already holds an adapter named {name!r}; use replace()")
    return adapter_set({**_members(aset), name: (params, config)})


def remove(aset: AdapterSet, name: str) -> AdapterSet:
    """The set without adapter `name`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    >>> a, b = (lora_jax.inject(base, config, jax.random.key(seed)) for seed in (1, 2))
    >>> remove(adapter_set({"a": (a, config), "b": (b, config)}), "a").names
    ('b',)
    """
    aset.index(name)
    if len(aset.names) == 1:
        raise ValueError(f"{name!r} is the set's only adapter; keep the base params instead")
    return adapter_set({n: v for n, v in _members(aset).items() if n != name})


def replace(aset: AdapterSet, name: str, params: Mapping[str, Any],
            config: AdapterConfig) -> AdapterSet:
    """The set with adapter `name`'s slot holding `params` instead. When the new adapter fits the
    slot (its targets adapted by the set, ranks no larger) only array values change, so a
    jitted function does not recompile; otherwise the set is rebuilt.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    >>> a, b = (lora_jax.inject(base, config, jax.random.key(seed)) for seed in (1, 2))
    >>> aset = replace(adapter_set({"a": (a, config)}), "a", b, config)
    >>> bool(jnp.array_equal(adapter(aset, "a")[0]["lora_B"], b["lora_B"]))
    True
    """
    k = aset.index(name)
    new, current = _by_weight(params), _by_weight(aset.params)
    if not set(new) <= set(current) or any(new[key].record.rank > current[key].record.rank
                                           for key in new):
        return adapter_set({**_members(aset), name: (params, config)})
    check_same_base(aset.params, params, f"adapter {name!r}")
    # One slot of the new adapter (scales as arrays), padded to the set's ranks below.
    rebuilt = _by_weight(adapter_set({name: (params, config)}).params)
    updates: dict[str, dict[str, Any]] = {}
    for key, item in current.items():
        record, axis = item.record, item.record.layout.stacked
        slot = lambda leaves, axis=axis: {n: jnp.take(v, 0, axis=axis) for n, v in leaves.items()}
        if key in new:
            one = rebuilt[key]
            arrays = variants.of(record).resize(slot(one.leaves), leading(record), record.rank)
            s_new = jnp.take(one.scale, 0, axis=axis)
        else:
            arrays = {n: jnp.zeros_like(v) for n, v in slot(item.leaves).items()}
            s_new = jnp.zeros_like(jnp.take(item.scale, 0, axis=axis))
        updates.setdefault(item.path, {}).update({
            **{record.keys[n]: _put(item.leaves[n], v, k, axis) for n, v in arrays.items()},
            scale_name(record.weight): _put(item.scale, s_new, k, axis)})
    records_ = list(aset.records)
    records_[k] = {key: i.record for key, i in new.items()}
    configs = list(aset.configs)
    configs[k] = config
    return AdapterSet(with_leaves(aset.params, updates), aset.names, tuple(configs),
                      tuple(records_))


def _put(full: jax.Array, part: jax.Array, k: int, axis: int) -> jax.Array:
    """`full` with slot k of its adapter axis set to `part`."""
    moved = jnp.moveaxis(full, axis, 0).at[k].set(part.astype(full.dtype))
    return jnp.moveaxis(moved, 0, axis)


def _members(aset: AdapterSet) -> dict[str, tuple[Mapping[str, Any], AdapterConfig]]:
    return {name: adapter(aset, name) for name in aset.names}


# --- files: peft's multi-adapter folder layout ---------------------------------------------------

def _folder_of(root: Path, name: str) -> Path:
    # peft's save_pretrained: the adapter "default" at the root, every other in root/<name>.
    return root if name == "default" else root / name


def save_set(path: str | os.PathLike, aset: AdapterSet, **save_kwargs: Any) -> None:
    """Write every adapter of the set as peft's `save_pretrained` lays out several adapters:
    "default" in `path`, each other adapter in `path/<name>` (each a plain peft adapter, with
    its own rank and scale). `save_kwargs` go to `lora_jax.save_peft` (e.g. model_type).

    >>> import os, tempfile
    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 3))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    >>> a, b = (lora_jax.inject(base, config, jax.random.key(seed)) for seed in (1, 2))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_set(folder, adapter_set({"default": (a, config), "b": (b, config)}))
    ...     files, aset = sorted(os.listdir(folder)), load_set(folder, base)
    >>> files, aset.names, aset.params["lora_A"].shape  # [K, in, r]
    (['adapter_config.json', 'adapter_model.safetensors', 'b'], ('default', 'b'), (2, 3, 2))
    """
    root = Path(path)
    for name in aset.names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"adapter name {name!r} cannot be a folder name")
    for name in aset.names:
        params, config = adapter(aset, name)
        save_peft(_folder_of(root, name), params, config, **save_kwargs)


def load_set(path: str | os.PathLike, params: Mapping[str, Any],
             names: Sequence[str] | None = None, **load_kwargs: Any) -> AdapterSet:
    """An `AdapterSet` over base `params` from a folder in peft's multi-adapter layout
    (`save_set`, or peft's `save_pretrained` with several adapters). `names`: which adapters
    (default: all found, "default" first). `load_kwargs` go to `lora_jax.load_peft`. Example:
    `save_set`.
    """
    root = Path(path)
    found = []
    if root.is_dir():
        found = (["default"] if (root / "adapter_config.json").is_file() else []) + sorted(
            p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not found:
        raise ValueError(f"{os.fspath(root)!r} holds no peft adapter (no adapter_config.json "
                         "in it or its subfolders)")
    for name in names or ():
        if name not in found:
            raise ValueError(f"no adapter {name!r} in {os.fspath(root)!r}; found {found}")
    return adapter_set({name: load_peft(_folder_of(root, name), params, **load_kwargs)
                        for name in (names or found)})
