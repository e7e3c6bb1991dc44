"""`loraplus`: LoRA+ learning rates (peft's `create_loraplus_optimizer`) as an optax transform."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_jax.core.config import is_number

_EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")


def loraplus_labels(trainable: Any) -> Any:
    """"A", "B" or "embedding" for every trainable leaf (None holes stay None).

    B factors and every 1-D trainable (biases, DoRA magnitudes) are "B", as in peft; embedding
    factors are "embedding", as peft's docs say (its code puts them in group A).
    """

    def label(path: tuple[Any, ...], leaf: Any) -> str:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in _EMBEDDING_FACTORS:
            return "embedding"
        if name.endswith("lora_B") or leaf.ndim == 1:
            return "B"
        return "A"

    return jax.tree_util.tree_map_with_path(label, trainable)


def loraplus(
    optimizer: Callable[[float], optax.GradientTransformation],
    learning_rate: float,
    *,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
) -> optax.GradientTransformation:
    """`optimizer(lr)` for A factors (and other matrices), `optimizer(lr * ratio)` for B factors
    and 1-D trainables, `optimizer(loraplus_lr_embedding)` for embedding factors (LoRA+,
    arXiv 2402.12354; peft's docs suggest a ratio of 16). Apply it to the trainable half.

    >>> import jax.numpy as jnp
    >>> trainable = {"q": {"kernel": None, "lora_A": jnp.ones((4, 2)), "lora_B": jnp.ones((2, 3))}}
    >>> tx = loraplus(optax.sgd, 0.1, loraplus_lr_ratio=16)
    >>> updates, _ = tx.update(trainable, tx.init(trainable))
    >>> round(float(updates["q"]["lora_A"][0, 0]), 6), round(float(updates["q"]["lora_B"][0, 0]), 6)
    (-0.1, -1.6)
    """
    for name, value in (("loraplus_lr_ratio", loraplus_lr_ratio),
                        ("learning_rate", learning_rate),
                        ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if not is_number(value) or not math.isfinite(value) or not value > 0:
            raise ValueError(f"loraplus: {name} must be a positive finite number, got {value!r}")
    return optax.multi_transform(
        {"A": optimizer(learning_rate), "B": optimizer(learning_rate * loraplus_lr_ratio),
         "embedding": optimizer(loraplus_lr_embedding)},
        loraplus_labels,
    )
