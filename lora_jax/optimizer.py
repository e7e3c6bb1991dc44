"""`optimizer`: an optax transformation that trains only the trainable leaves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.config import LoraConfig
from lora_jax.partition import combine, has_factors, split
from lora_jax.targets import iter_modules


def optimizer(
    tx: optax.GradientTransformation, params: Mapping[str, Any], config: LoraConfig
) -> optax.GradientTransformation:
    """`tx` applied to the trainable leaves only, on whole-tree params and gradients.

    Optimizer state exists only for the trainable leaves (Adam's state is 2x their bytes, not the
    model's); frozen leaves get zero updates, so `optax.apply_updates` leaves them bit-identical.

    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"kernel": jnp.ones((3, 4)), "lora_A": jnp.ones((3, 2)),
    ...           "lora_B": jnp.zeros((2, 4))}
    >>> tx = optimizer(optax.adam(1e-3), params, LoraConfig(r=2))
    >>> jax.tree.map(jnp.shape, tx.init(params)[0].mu)
    {'kernel': None, 'lora_A': (3, 2), 'lora_B': (2, 4)}
    """
    if not any(has_factors(module) for _, module in iter_modules(params)):
        raise ValueError("optimizer: the params hold no LoRA factors; call lora_jax.inject first")

    def init_fn(params: Any) -> optax.OptState:
        trainable, _ = split(params, config)
        return tx.init(trainable)

    def update_fn(updates: Any, state: optax.OptState, params: Any = None
                  ) -> tuple[Any, optax.OptState]:
        trainable_grads, frozen_grads = split(updates, config)
        trainable_params = None if params is None else split(params, config)[0]
        trainable_updates, state = tx.update(trainable_grads, state, trainable_params)
        return combine(trainable_updates, jax.tree.map(jnp.zeros_like, frozen_grads)), state

    return optax.GradientTransformation(init_fn, update_fn)
