"""Parameter counts, and peft's `print_trainable_parameters` line."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax import variants
from lora_jax.core.config import LoraConfig
from lora_jax.core.partition import split
from lora_jax.core.record import iter_records


def _not_counted(params: Mapping[str, Any]) -> tuple[int, int]:
    """(unused, buffers): adapter entries that stay zero (scanned layers left out by
    `layers_to_transform`, the padding beyond each layer's own rank in a stack with per-layer
    ranks), and the frozen leaves of variants (VeRA's projections: buffers in peft, no
    parameters)."""
    unused = buffers = 0
    for item in iter_records(params):
        record = item.record
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


def count_parameters(params: Mapping[str, Any], config: LoraConfig) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes the trained adapter leaves but not
    frozen ones (VeRA's projections, peft's buffers), as peft counts.

    One difference from peft: for `modules_to_save` peft keeps a frozen original beside the
    trained copy and counts both; lora_jax trains the module in place and counts it once (but
    an embedding table's frozen original, kept for a tied head, counts as in peft).

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
    n_total = sum(x.size for x in jax.tree.leaves(params)) - unused - buffers
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
