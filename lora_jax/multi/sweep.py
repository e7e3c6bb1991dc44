"""Sweeps: K LoRA adapters (seeds, learning rates, alphas, ranks) trained at once on one frozen
base, in one compiled step that `vmap`s over the adapter axis (docs/guides/many_adapters.md).

Each point is injected with its own config and key (it starts as when trained alone), its ranks
padded with zeros to the largest (zero columns of A and rows of B get zero gradients, so Adam /
AdamW, weight decay included, keep them zero) and its scales made array leaves
(`LoraRecord.scale=None`), so all K trees share one structure. Only the trained leaves and the
scales gain a leading K axis; the base is passed once (`in_axes=None`). Each point's learning
rate is data in its optimizer state (`optax.inject_hyperparams`). `unstack` gives each point
back as a plain adapter.

>>> import flax.linen as nn, jax, jax.numpy as jnp, optax, lora_jax
>>> model, x = nn.Dense(4), jnp.ones((2, 8))
>>> base = model.init(jax.random.key(0), x)["params"]
>>> config = lora_jax.LoraConfig(r=2, target_modules=".*")
>>> sw = sweep(base, config, [{"seed": 0, "lr": 1e-2, "r": 2}, {"seed": 1, "lr": 3e-2, "r": 4}])
>>> sw.trainable["lora_A"].shape  # [K, in, largest r]
(2, 8, 4)
>>> apply = lora_jax.wrap(model.apply, sw.config)
>>> forward = lambda p, batch, key: apply({"params": p}, batch["x"])
>>> tx = lambda lr: optax.adam(lr)
>>> step, state = make_step(forward, "classify", tx), init_state(sw, tx)
>>> batch = {"x": x, "labels": jnp.array([0, 3])}
>>> trainable, state, losses = step(sw.trainable, sw.scales, sw.frozen, state, batch,
...                                 dropout_keys(sw, 0))
>>> losses.shape
(2,)
>>> [p["lora_A"].shape for p, _ in unstack(sw, trainable)]  # true ranks again
[(8, 2), (8, 4)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import variants
from lora_jax.core.config import LoraConfig
from lora_jax.core.inject import inject
from lora_jax.core.partition import combine, split
from lora_jax.core.record import LoraRecord, leading, record_name, records, scale_name
from lora_jax.core.targets import join_path, same_value, with_leaves, without_leaves
from lora_jax.multi.adapters import Key, _by_weight, _full_scale, _own_leaves
from lora_jax.train.loop import Forward, train_step

Params = dict[str, Any]

# What a point may set: its key for `inject` (and dropout), its config's r and lora_alpha, and
# the optimizer's hyperparameters (passed by name to the `tx` factory, as data).
SWEEP_KEYS = ("seed", "lr", "r", "lora_alpha", "weight_decay")
OPTIMIZER_KEYS = ("lr", "weight_decay")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """K adapters over one base, ready for `make_step`.

    `trainable` (the trained leaves) and `scales` (each adapted weight's scale) hold the K points
    on a leading axis; `frozen` is the base once (with the shared records: padded rank, array
    scale). `configs` and `records` are each point's own (true ranks and scales, for `unstack`),
    `hyperparams` the optimizer's values per point (`{"lr": [K]}`), `seeds` the points' keys.
    """

    trainable: Params
    scales: Params
    frozen: Params
    configs: tuple[LoraConfig, ...]
    records: tuple[Mapping[Key, LoraRecord], ...]
    hyperparams: Mapping[str, np.ndarray]
    seeds: tuple[int, ...]

    @property
    def size(self) -> int:
        """K, the number of points."""
        return len(self.configs)

    @property
    def config(self) -> LoraConfig:
        """A config for `wrap` / `split` of every point (the records decide ranks and scales)."""
        return self.configs[0]


def point_config(config: LoraConfig, point: Mapping[str, Any]) -> LoraConfig:
    """`config` with the point's `r` / `lora_alpha`; raises on an unknown or fixed key."""
    fields = {f.name for f in dataclasses.fields(config)}
    for key in (k for k in point if k not in SWEEP_KEYS):
        if key in fields:  # e.g. target_modules, use_dora
            raise ValueError(
                f"a sweep point sets {key!r}: the K adapters of a sweep share one static "
                f"structure, so only {list(SWEEP_KEYS)} may vary; run one sweep per {key}")
        raise ValueError(f"unknown sweep key {key!r}: a point may set {list(SWEEP_KEYS)}")
    return dataclasses.replace(config, **{k: point[k] for k in ("r", "lora_alpha")
                                          if k in point})


def sweep(base: Mapping[str, Any], config: LoraConfig, points: Sequence[Mapping[str, Any]], *,
          layouts: Mapping[str, Any] | None = None, dtype: Any = jnp.float32) -> Sweep:
    """A `Sweep` of `points` (each a dict of `SWEEP_KEYS`: `seed` (default 0), `lr`, `r`,
    `lora_alpha`, `weight_decay`) on `base`: point k is `inject(base, point_config(config,
    point), jax.random.key(seed), layouts=layouts, dtype=dtype)`, so its start equals training
    it alone."""
    if not points:
        raise ValueError("the sweep is empty: give at least one point")
    configs = [point_config(config, p) for p in points]
    adapters = [(inject(base, c, jax.random.key(p.get("seed", 0)), layouts=layouts, dtype=dtype),
                 c) for p, c in zip(points, configs, strict=True)]
    return stack(adapters, hyperparams=_hyperparams(points),
                 seeds=[p.get("seed", 0) for p in points])


def _hyperparams(points: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in OPTIMIZER_KEYS:
        given = [i for i, p in enumerate(points) if key in p]
        if given and len(given) < len(points):
            missing = sorted(set(range(len(points))) - set(given))
            raise ValueError(f"sweep points {missing} have no {key!r} while others do: give "
                             "every point a value")
        if given:
            out[key] = np.asarray([float(p[key]) for p in points], np.float32)
    return out


def _padded(tree: Mapping[str, Any], ranks: Mapping[Key, int]) -> Params:
    """`tree` with every adapter's ranks padded to `ranks` and its scale an array leaf."""
    updates: dict[str, dict[str, Any]] = {}
    for key, item in _by_weight(tree).items():
        record, rank = item.record, ranks[key]
        variant = variants.of(record)
        variant.check("sweeps", repr(item.target))
        updates.setdefault(item.path, {}).update({
            **{record.keys[n]: v for n, v in variant.resize(
                item.leaves, leading(record), rank).items()},
            scale_name(record.weight): _full_scale(item),
            record_name(record.weight): dataclasses.replace(record, rank=rank, scale=None),
        })
    return with_leaves(tree, updates)


def _part(tree: Mapping[str, Any], leaves: set[tuple[str, str]], keep: bool,
          prefix: str = "") -> Params:
    """`tree` with None in place of every leaf not in `leaves` (`keep`) or in it (a part as
    `split` makes them)."""
    return {k: _part(v, leaves, keep, f"{prefix}.{k}" if prefix else k)
            if isinstance(v, Mapping) else (v if ((prefix, k) in leaves) == keep else None)
            for k, v in tree.items()}


def _differences(first: Params, other: Params, k: int, what: str) -> None:
    structures = jax.tree.structure(first), jax.tree.structure(other)
    if structures[0] != structures[1]:  # type: ignore[operator]  # jaxlib: no PyTreeDef stub
        mine = {join_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(first)}
        theirs = {join_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(other)}
        raise ValueError(f"sweep point {k}'s {what} differ from point 0's in "
                         f"{sorted(mine ^ theirs)[:5] or 'their records (layout, layers)'}: "
                         "points may differ in seed, lr, r, lora_alpha and weight_decay only")


def stack(adapters: Sequence[tuple[Mapping[str, Any], LoraConfig]], *,
          hyperparams: Mapping[str, Any] | None = None,
          seeds: Sequence[int] | None = None) -> Sweep:
    """A `Sweep` of K injected adapters `[(params, config)]` over one base (e.g. each from
    `inject` with its own config and key). They must adapt the same weights the same way and
    train the same leaves; ranks and scales may differ. `hyperparams`: `{name: [K values]}`
    for the optimizer factory; `seeds`: the points' dropout seeds (default 0)."""
    if not adapters:
        raise ValueError("the sweep is empty: give at least one point")
    found = [_by_weight(params) for params, _ in adapters]
    for k, items in enumerate(found[1:], 1):
        if items.keys() != found[0].keys():
            diff = sorted(f"{p}.{w}" for p, w in items.keys() ^ found[0].keys())
            raise ValueError(f"sweep point {k} adapts other weights than point 0 ({diff[:5]}): "
                             "all points need the same target_modules")
    for items in found:
        for item in items.values():
            if item.record.adapters:
                raise ValueError(f"{item.target!r} holds an adapter set; a sweep trains "
                                 "single adapters")
    ranks = {key: max(items[key].record.rank for items in found) for key in found[0]}
    trainables, scales, frozens = [], [], []
    for k, (params, config) in enumerate(adapters):
        padded = _padded(params, ranks)
        scale_leaves = {(i.path, scale_name(i.record.weight)) for i in records(padded)}
        trainable, frozen = split(padded, config)
        trainables.append(trainable)
        scales.append(_part(padded, scale_leaves, True))
        frozens.append(_part(frozen, scale_leaves, False))
        _differences(trainables[0], trainable, k, "trained leaves")
        _differences(frozens[0], frozens[-1], k, "frozen leaves or records")
        for (path, ref), value in zip(jax.tree_util.tree_leaves_with_path(frozens[0]),
                                      jax.tree.leaves(frozens[-1]), strict=True):
            if not same_value(value, ref):
                raise ValueError(f"sweep point {k} changes the frozen {join_path(path)!r}: the "
                                 "points of a sweep share one base (no PiSSA / OLoRA / LoftQ "
                                 "init, which changes it)")
    stacked = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    return Sweep(stacked(trainables), stacked(scales), frozens[0],
                 tuple(c for _, c in adapters),
                 tuple({key: i.record for key, i in items.items()} for items in found),
                 dict(hyperparams or {}), tuple(seeds or (0,) * len(adapters)))


def init_state(sw: Sweep, tx: Callable[..., optax.GradientTransformation]) -> Any:
    """The K optimizer states (leading K axis) of `tx(**hyperparams)` for `sw`'s points; the
    hyperparameters are data in each state (`optax.inject_hyperparams`)."""
    injected = optax.inject_hyperparams(tx)
    return jax.vmap(lambda t, hp: injected(**hp).init(t))(
        sw.trainable, {k: jnp.asarray(v) for k, v in sw.hyperparams.items()})


def make_step(forward: Forward, task: str, tx: Callable[..., optax.GradientTransformation],
              *, batch_axis: int | None = None) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """jitted `step(trainable, scales, frozen, opt_state, batch, keys) -> (trainable, opt_state,
    losses [K])`: `lora_jax.train.loop.make_step`'s step `vmap`ped over the points.

    `forward(params, batch, dropout_key) -> logits` is one point's (e.g. built on
    `wrap(apply, sw.config)`), `task` a `train.loop.task_loss` task, `tx(**hyperparams)` the
    optimizer of a point's values. `frozen` is not batched (one base for all points); `batch`
    is shared (`batch_axis=None`) or one per point (`batch_axis=0`); `keys` are the points'
    dropout keys (`dropout_keys`). `trainable` and `opt_state` are donated.
    """
    injected = optax.inject_hyperparams(tx)

    def one(trainable: Params, scales: Params, frozen: Params, opt_state: Any, batch: Any,
            key: jax.Array) -> tuple[Params, Any, jax.Array]:
        step = train_step(forward, task, injected(**opt_state.hyperparams))
        return step(trainable, combine(scales, frozen), opt_state, batch, key)

    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, 0, batch_axis, 0)),
                   donate_argnums=(0, 3))


def dropout_keys(sw: Sweep, step: int) -> jax.Array:
    """The points' dropout keys of `step`: `fold_in(key(seed), step)`, as `lora_jax.train.loop.fit`
    draws them for a run with that seed."""
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(
        jnp.asarray(sw.seeds, jnp.uint32))


def unstack(sw: Sweep, trainable: Params) -> list[tuple[Params, LoraConfig]]:
    """Each point as `(params, config)`: its trained leaves from `trainable` (`[K, ...]`) over
    the base, with its true ranks and scales (a plain adapter, e.g. for `save_peft`)."""
    out = []
    for k in range(sw.size):
        params = combine(*jax.tree.map(lambda x, k=k: x[k], (trainable, sw.scales)), sw.frozen)
        updates: dict[str, dict[str, Any]] = {}
        drop: set[tuple[str, str]] = set()
        for key, item in _by_weight(params).items():
            own = sw.records[k][key]
            if own.scale is not None:
                drop.add((item.path, scale_name(own.weight)))
            updates.setdefault(item.path, {}).update(_own_leaves(own, item.leaves))
        out.append((with_leaves(without_leaves(params, drop), updates), sw.configs[k]))
    return out
