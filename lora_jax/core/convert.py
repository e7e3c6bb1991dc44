"""`to_plain_lora`: turn an adapter trained from a PiSSA / OLoRA start into a plain LoRA of the
untouched base (peft's `path_initial_model_for_weight_conversion`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.core.config import LoraConfig
from lora_jax.core.record import factor_names, records
from lora_jax.core.targets import with_leaves


def to_plain_lora(params: Mapping[str, Any], initial_params: Mapping[str, Any],
                  config: LoraConfig) -> tuple[dict[str, Any], LoraConfig]:
    """(params, config) of a rank-2r plain LoRA with the same effect on the original base.

    PiSSA / OLoRA train A B on the residual base W - s A0 B0; on W itself the same model is
    W + s (A B - A0 B0) = W + s [A | A0] [B ; -B0]: the rank doubles, alpha doubles (x sqrt(2)
    under rsLoRA) so the scale stays, and init_lora_weights becomes True. `initial_params` are
    the params right after `inject` (their factors are A0, B0). The base weights in the result
    are still the residual ones: pair the adapter with the original base.

    >>> import flax.linen as nn, jax, warnings
    >>> from lora_jax import inject
    >>> config = LoraConfig(r=2, target_modules=".*", init_lora_weights="pissa")
    >>> base = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 6)))["params"]
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     start = inject(base, config, jax.random.key(1))
    >>> plain, plain_config = to_plain_lora(start, start, config)
    >>> plain["lora_A"].shape, plain_config.r, plain_config.init_lora_weights
    ((6, 4), 4, True)
    """
    updates: dict[str, dict[str, Any]] = {}
    initial = {(item.path, item.record.weight): item for item in records(initial_params)}
    for item in records(params):
        record = item.record
        start = initial.get((item.path, record.weight))
        if start is None or start.record.rank != record.rank:
            raise ValueError(
                f"initial_params has no factors of rank {record.rank} for {item.target!r}: pass "
                "the params returned by inject (before training)"
            )
        if record.variant != "lora":
            raise ValueError(f"{item.target!r} is a {record.variant} adapter; only plain LoRA "
                             "factors convert to the original base")
        (a, b), (a0, b0) = item.factors, start.factors
        a_name, b_name, record_name = factor_names(record.weight)
        n_stack = len(record.layout.split(tuple(item.weight.shape))[0])
        updates.setdefault(item.path, {}).update({
            a_name: jnp.concatenate([a, a0.astype(a.dtype)], axis=-1),
            b_name: jnp.concatenate([b, -b0.astype(b.dtype)], axis=n_stack),
            record_name: dataclasses.replace(record, rank=2 * record.rank),
        })
    grow = math.sqrt(2) if config.use_rslora else 2
    plain_config = LoraConfig.from_dict({
        **config.to_dict(),
        "r": 2 * config.r, "lora_alpha": grow * config.lora_alpha,
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: grow * v for k, v in config.alpha_pattern.items()},
        "init_lora_weights": True,
    })
    return with_leaves(params, updates), plain_config
