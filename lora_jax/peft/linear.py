"""peft's view of a weight of several input / output axes, or of an `[out, in]` kernel
(transformers' FlaxConv1D): the PyTorch Linear of its row-major flattening.

An einsum kernel [D, N, H] is a Linear [N*H, D] in torch (HF Llama's q_proj): `save_peft` writes,
and `load_peft` reads, it as the Linear kernel `[*stack, fan_in, fan_out]`, the adapter's arrays
reshaped alike (LoRA's A [D, r] / B [r, N*H]), for both frontends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lora_jax import variants
from lora_jax.core.factors import MATERIALISE, Layout
from lora_jax.core.record import LoraRecord, iter_records, record_name, scale_name
from lora_jax.core.targets import iter_modules, with_leaves, without_leaves


def linear_layout(layout: Layout, weight: str, ndim: int) -> Layout | None:
    """The layout of a weight's Linear form (stacked axes kept), or None when it is a Linear
    kernel already (or an embedding, a conv, materialised or with kept axes: no Linear form)."""
    if layout.rule == MATERIALISE or layout.kind not in ("dense", "einsum"):
        return None
    roles = layout.roles(ndim)
    if "b" in roles or weight == "kernel" and roles[layout.stacked:] == "io":
        return None
    return Layout("dense", stacked=layout.stacked, rule=layout.rule, weight="kernel")


def _reshaped(record: LoraRecord, leaves: Mapping[str, Any], shape: tuple[int, ...],
              name: str, layout: Layout) -> dict[str, Any]:
    """The record's arrays (and array scale) beside a weight `name` of `shape` read by
    `layout`, reshaped to it, with the record saying so."""
    mine = dataclasses.replace(record, weight=name, layout=layout)
    shapes = variants.of(record).shapes(shape, layout, record.rank)
    out: dict[str, Any] = {mine.keys[n]: leaves[key].reshape(shapes[n])
                           for n, key in record.keys.items()}
    if record.scale is None:
        out[scale_name(name)] = leaves[scale_name(record.weight)]
    return {**out, record_name(name): mine}


def as_linear(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` with each adapted weight that has a Linear form replaced by it (`kernel`) and
    its arrays reshaped alike."""
    updates: dict[str, dict[str, Any]] = {}
    drop: set[tuple[str, str]] = set()
    for item in iter_records(tree):
        record, weight = item.record, item.weight
        layout = linear_layout(record.layout, record.weight, weight.ndim)
        if layout is not None:
            kernel = record.layout.to_canonical(weight)
            updates[item.path] = {"kernel": kernel, **_reshaped(
                record, item.module, kernel.shape, "kernel", layout)}
            drop |= {(item.path, n) for n in (record.weight, *record.leaves)}
    return with_leaves(without_leaves(tree, drop), updates) if updates else dict(tree)


def flatten(params: Mapping[str, Any], layouts: Mapping[str, Layout]
            ) -> tuple[dict[str, Any], dict[str, tuple[str, Layout]]]:
    """(params with each weight of `layouts` (by target path, `lora_jax.layouts`) that has a
    Linear form replaced by it as `kernel`, {module path: (weight name, layout)} of those)."""
    nodes = dict(iter_modules(params, leaves=None))
    flattened: dict[str, tuple[str, Layout]] = {}
    for target, layout in layouts.items():
        name = layout.weight or "kernel"
        path = target[:-len(name) - 1] if target.endswith(f".{name}") and target not in nodes \
            else target
        node = nodes.get(path)
        if layout.error or node is None or name not in node or \
                linear_layout(layout, name, node[name].ndim) is None:
            continue
        if name != "kernel" and "kernel" in node:
            raise ValueError(f"{path!r} holds both 'kernel' and the adapted {name!r}; peft's "
                             "files name one weight per module")
        flattened[path] = (name, layout)
    flat = with_leaves(without_leaves(params, {(p, n) for p, (n, _) in flattened.items()}), {
        p: {"kernel": layout.to_canonical(nodes[p][n])} for p, (n, layout) in flattened.items()})
    return flat, flattened


def unflatten(tree: Mapping[str, Any], base: Mapping[str, Any],
              flattened: Mapping[str, tuple[str, Layout]]) -> dict[str, Any]:
    """The inverse of `flatten` on a tree loaded from peft: the base's own weights back, and
    the adapters' arrays reshaped to their weights' axes."""
    modules = dict(iter_modules(tree, leaves=None))
    originals = dict(iter_modules(base, leaves=None))
    updates: dict[str, dict[str, Any]] = {}
    drop: set[tuple[str, str]] = set()
    for path, (name, layout) in flattened.items():
        node, weight = modules[path], originals[path][name]
        record = next((v for v in node.values() if isinstance(v, LoraRecord)), None)
        drop.add((path, "kernel"))
        updates[path] = {name: weight}
        if record is not None:
            updates[path].update(_reshaped(record, node, weight.shape, name, layout))
            drop |= set((path, n) for n in record.leaves)
    return with_leaves(without_leaves(tree, drop), updates)
