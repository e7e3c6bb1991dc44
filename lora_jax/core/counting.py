"""Parameter counts, and peft's `print_trainable_parameters` line."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax import variants
from lora_jax.core.config import LoraConfig
from lora_jax.core.partition import split
from lora_jax.core.record import iter_records, scale_name
from lora_jax.core.saved import is_original
from lora_jax.core.targets import saved_name_match


def _not_counted(params: Mapping[str, Any]) -> tuple[int, int]:
    """(unused, buffers): adapter entries that stay zero (layers left out, padding beyond a
    layer's own rank), and frozen variant leaves (VeRA's projections, peft's buffers) and array
    scales."""
    unused = buffers = 0
    for item in iter_records(params):
        record = item.record
        if record.scale is None:  # an array scale (per layer / adapter): data, no parameter
            buffers += item.module[scale_name(record.weight)].size
        for leaf in variants.of(record).leaves_of(record):
            value = item.leaves[leaf.name]
            if not leaf.trained:
                buffers += value.size
                continue
            if record.layers is None and record.ranks is None:
                continue
            n_layers = item.weight.shape[0]
            ranks = record.ranks or (record.rank,) * n_layers
            kept = [ranks[i] for i in range(n_layers)
                    if record.layers is None or i in record.layers]
            size = math.prod(value.shape[1:])
            unused += size // record.rank * (record.rank * n_layers - sum(kept)) if "r" in \
                leaf.axes else size * (n_layers - len(kept))
    return unused, buffers


def _saved_originals(params: Mapping[str, Any], config: LoraConfig) -> int:
    """The size of the frozen originals peft keeps beside each `modules_to_save` copy that
    lora_jax does not hold (it trains the module in place; a table's original it keeps,
    `lora_jax.core.saved`, is in the tree already)."""
    def walk(node: Mapping[str, Any], path: str) -> int:
        size = 0
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            if not isinstance(value, Mapping):
                continue
            if not saved_name_match(config.modules_to_save, child):
                size += walk(value, child)
                continue
            for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(value):
                name = str(getattr(leaf_path[-1], "key", ""))
                size += -leaf.size if is_original(name) else leaf.size
        return size

    return walk(params, "") if config.modules_to_save else 0


def count_parameters(params: Mapping[str, Any], config: LoraConfig) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes the trained adapter leaves but not
    frozen ones (VeRA's projections, peft's buffers), as peft counts.

    For `modules_to_save` peft keeps a frozen original beside the trained copy and counts both;
    lora_jax trains the module in place, and counts the original as peft does.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import inject
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> count_parameters(inject(params, config, jax.random.key(1)), config)
    (14, 30)
    """
    trainable, _ = split(params, config)
    unused, buffers = _not_counted(params)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable)) - unused
    n_total = sum(x.size for x in jax.tree.leaves(params)) - unused - buffers \
        + _saved_originals(params, config)
    return n_trainable, n_total


def print_trainable_parameters(params: Mapping[str, Any], config: LoraConfig) -> None:
    """Print peft's line: `trainable params: X || all params: Y || trainable%: Z`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*")
    >>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
    ...                          jax.random.key(1))
    >>> print_trainable_parameters(params, config)  # A [4, 2] + B [2, 4]; kernel + bias 20
    trainable params: 16 || all params: 36 || trainable%: 44.4444
    """
    trainable, total = count_parameters(params, config)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
