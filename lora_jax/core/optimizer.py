"""`optimizer`: an optax transformation that trains only the trainable leaves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lora_jax.core.config import LoraConfig
from lora_jax.core.partition import combine, select, trainable_mask
from lora_jax.core.record import check_config, records


def optimizer(
    tx: optax.GradientTransformation, params: Mapping[str, Any], config: LoraConfig
) -> optax.GradientTransformation:
    """`tx` applied to the trainable leaves only, on whole-tree params and gradients.

    State exists only for the trainable leaves; frozen leaves get zero updates, so
    `optax.apply_updates` leaves them bit-identical. This form rewrites every frozen weight
    each step: where no API insists on whole-tree updates, `split` once and update only the
    trainable half with `tx` itself, as the CLI does (`experiments/benchmark.py` measures it).

    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from lora_jax import inject
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> params = nn.Dense(4, use_bias=False).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> params = inject(params, config, jax.random.key(1))
    >>> tx = optimizer(optax.adam(1e-3), params, config)
    >>> jax.tree.map(jnp.shape, tx.init(params)[0].mu)
    {'kernel': None, 'lora': None, 'lora_A': (3, 2), 'lora_B': (2, 4)}
    """
    for item in records(params):
        check_config(item, config)
    # Decided once from `params`' records: updates may come for the trainable half only.
    mask = trainable_mask(params, config)

    def init_fn(params: Any) -> optax.OptState:
        return tx.init(select(params, mask, True))

    def update_fn(updates: Any, state: optax.OptState, params: Any = None
                  ) -> tuple[Any, optax.OptState]:
        trainable_params = None if params is None else select(params, mask, True)
        trainable_updates, state = tx.update(select(updates, mask, True), state,
                                             trainable_params)
        frozen = jax.tree.map(jnp.zeros_like, select(updates, mask, False))
        return combine(trainable_updates, frozen), state

    return optax.GradientTransformation(init_fn, update_fn)
