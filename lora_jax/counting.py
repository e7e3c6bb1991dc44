"""Parameter counts, and peft's `print_trainable_parameters` line."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.config import LoraConfig
from lora_jax.factors import FACTOR_LEAVES
from lora_jax.partition import split
from lora_jax.targets import iter_modules


def _unused_factor_count(params: Mapping[str, Any], config: LoraConfig) -> int:
    """Factor entries of scanned layers left out by `layers_to_transform` (kept at zero)."""
    wanted = config.layers_to_transform
    if wanted is None:
        return 0
    n_wanted = 1 if isinstance(wanted, int) else len(set(wanted))
    unused = 0
    for _, module in iter_modules(params):
        factors = [module[name] for name in FACTOR_LEAVES if name in module]
        if not factors:
            continue
        weight = module["embedding" if "embedding" in module else "kernel"]
        if factors[0].ndim + factors[1].ndim - 2 > weight.ndim:  # stacked: a leading layer axis
            per_layer = sum(math.prod(f.shape[1:]) for f in factors)
            unused += per_layer * (weight.shape[0] - n_wanted)
    return unused


def count_parameters(params: Mapping[str, Any], config: LoraConfig) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes the factors, as peft counts.

    One difference from peft: for `modules_to_save` peft keeps a frozen original beside the
    trained copy and counts both; lora_jax trains the module in place and counts it once.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.ones((3, 4)), "lora_A": jnp.ones((3, 2)),
    ...           "lora_B": jnp.zeros((2, 4))}
    >>> count_parameters(params, LoraConfig(r=2))
    (14, 26)
    """
    trainable, _ = split(params, config)
    unused = _unused_factor_count(params, config)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable)) - unused
    n_total = sum(x.size for x in jax.tree.leaves(params)) - unused
    return n_trainable, n_total


def print_trainable_parameters(params: Mapping[str, Any], config: LoraConfig) -> None:
    """Print peft's line: `trainable params: X || all params: Y || trainable%: Z`."""
    trainable, total = count_parameters(params, config)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
