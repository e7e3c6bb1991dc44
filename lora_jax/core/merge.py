"""`merge`: fold the LoRA deltas into the weights, for inference or export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import variants
from lora_jax.core.config import AdapterConfig
from lora_jax.core.factors import Layout
from lora_jax.core.record import LoraRecord, check_assumed, check_config, records, without_adapters
from lora_jax.core.saved import drop_originals
from lora_jax.core.targets import unbox, with_leaves
from lora_jax.quant.quantize import dequantize


def merge(params: Mapping[str, Any], config: AdapterConfig | None = None,
          safe: bool = False, layouts: Mapping[str, Layout] | None = None) -> dict[str, Any]:
    """Plain params for the unmodified model: W + scale * A B, factors and records removed.

    Each weight's layout, rank and scale come from its record; a `config` given is checked to
    describe the same. The delta is added in float32 and the sum cast once to the weight's dtype;
    a boxed weight keeps its box, a quantized one comes back dequantized. `safe=True` raises if
    a merged weight holds NaN or inf, naming the weight and whether the base or the adapter
    brought it (a host check: not under `jit`). A head tied to an adapted or saved embedding
    table follows the merged table, unlike in the wrapped forward (as in peft). A square kernel
    adapted without `layouts` is refused unless `layouts=lora_jax.layouts(model, x)` confirms
    its `[in, out]` reading.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraConfig, inject
    >>> model, x = nn.Dense(4), jnp.ones((1, 3))
    >>> config = LoraConfig(r=2, lora_alpha=4, target_modules=".*", init_lora_weights=False)
    >>> params = inject(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1))
    >>> sorted(merge(params, config))
    ['bias', 'kernel']
    """
    found = records(params)
    check_assumed(params, layouts, "merge")
    updates: dict[str, dict[str, Any]] = {}
    for item in found:
        check_config(item, config)
        record, weight = item.record, item.weight
        plain = unbox(weight)
        if record.adapters:
            raise ValueError(f"{item.target!r} holds an adapter set: merge one adapter, "
                             "lora_jax.multi.adapters.select(params, index), not the set")
        merged = fold(record, plain, *record.read(item.module.__getitem__))
        if safe:
            _check_finite(".".join(filter(None, (item.path, record.weight))), plain, merged)
        boxed = weight.replace_boxed(merged) if hasattr(weight, "replace_boxed") else merged
        updates.setdefault(item.path, {})[record.weight] = boxed
    return dequantize(drop_originals(with_leaves(without_adapters(params), updates)))


def _check_finite(target: str, weight: Any, merged: Any) -> None:
    """`safe=True`'s check of one merged weight (`target`: its param path): NaN / inf raises
    naming whose it is."""
    if isinstance(merged, jax.core.Tracer):
        raise ValueError(f"merge(safe=True) checks {target!r} for NaN / inf on the host, which "
                         "cannot run under jax.jit: call merge outside jit, or with safe=False")
    if np.isfinite(np.asarray(merged, np.float32)).all():
        return
    if not np.isfinite(np.asarray(jnp.asarray(weight), np.float32)).all():
        raise ValueError(f"merge(safe=True): the base weight {target!r} holds NaN or inf before "
                         "merging; the base model's weights are broken, not the adapter")
    raise ValueError(f"merging {target!r} produced NaN or inf from a finite base weight; the "
                     "adapter's factors or scale are broken")


def fold(record: LoraRecord, weight: Any, leaves: Mapping[str, Any], scale: Any,
         layout: Layout | None = None) -> jax.Array:
    """`weight` with its adapter folded in: the variant's merge in float32, cast once to the
    weight's dtype (`layout`: the record's, or its reading inside a vmap / scan)."""
    merged = variants.of(record).merge(weight.astype(jnp.float32), leaves, scale,
                                       layout or record.layout)
    return merged.astype(weight.dtype)
