"""peft's files for weights adapted by name (`target_parameters`): MoE experts' 3-D weights.

peft nests the factors of a module's several targeted parameters (`<module>.base_layer.lora_A`
for the one before the last) and stores per-expert factors fused, rank-major (docs/guides/peft.md,
"The file format"); lora_jax keeps `A [E, in, r]`, `B [E, r, out]` (`Layout(order="boi")`).

    >>> a, b = np.arange(12.).reshape(2, 3, 2), np.arange(16.).reshape(2, 2, 4)  # E=2, r=2
    >>> lora_a, lora_b = to_peft(a, b)
    >>> lora_a.shape, lora_b.shape
    ((4, 3), (4, 4))
    >>> all(np.array_equal(x, y) for x, y in zip(from_peft(lora_a, lora_b, 2), (a, b)))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_jax.core.factors import Layout
from lora_jax.core.record import MATERIALISE

NEST = ".base_layer"
EXPERTS = "boi"  # the axes of transformers' fused experts: [E, out, in]


def is_expert(layout: Layout) -> bool:
    """Whether a record's layout is a layer rule's reading of fused experts `[E, out, in]`
    (what peft adapts through `target_parameters` with per-expert factors)."""
    return layout.order == EXPERTS and layout.rule != MATERIALISE


def to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """peft's `lora_A [r*E, in]`, `lora_B [out, r*E]` of per-expert `a [E, in, r]`, `b [E, r,
    out]`."""
    experts, fan_in, r = a.shape
    return (np.transpose(a, (0, 2, 1)).reshape(experts * r, fan_in),
            np.transpose(b, (2, 1, 0)).reshape(b.shape[2], r * experts))


def from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert `A [E, in, r]`, `B [E, r, out]` of peft's fused factors."""
    r = lora_a.shape[0] // experts
    a = np.transpose(lora_a.reshape(experts, r, lora_a.shape[1]), (0, 2, 1))
    b = np.transpose(lora_b.reshape(lora_b.shape[0], r, experts), (2, 1, 0))
    return a, b


def module_path(module: str, weight: str, adapted: Sequence[str]) -> str:
    """The path peft gives the factors of `weight`, one of the `adapted` weights of `module`."""
    return module + NEST * (len(adapted) - 1 - list(adapted).index(weight))


def split_nesting(path: str) -> tuple[str, int]:
    """(module path, depth) of a factor's module path: `m.base_layer.base_layer` -> (m, 2)."""
    depth = 0
    while path.endswith(NEST):
        path, depth = path[: -len(NEST)], depth + 1
    return path, depth
