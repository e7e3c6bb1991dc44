"""`to_plain_lora`: turn an adapter trained from a PiSSA / OLoRA start into a plain LoRA of the
untouched base (peft's `path_initial_model_for_weight_conversion`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax import variants
from lora_jax.core.config import LoraConfig, alpha_for, scaling
from lora_jax.core.record import leading, record_name, records
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
        variants.of(record).check("conversion", repr(item.target))
        (a, b), (a0, b0) = ((i.leaves["lora_A"], i.leaves["lora_B"]) for i in (item, start))
        updates.setdefault(item.path, {}).update({
            record.keys["lora_A"]: jnp.concatenate([a, a0.astype(a.dtype)], axis=-1),
            record.keys["lora_B"]: jnp.concatenate([b, -b0.astype(b.dtype)],
                                                   axis=leading(record)),
            record_name(record.weight): dataclasses.replace(record, rank=2 * record.rank),
        })
    # alpha grows so that the scale at rank 2r is the scale at r: by 2 (sqrt(2) under rsLoRA).
    grow = alpha_for(scaling(1.0, 1, config.use_rslora), 2, config.use_rslora)
    plain_config = config.replace(
        r=2 * config.r, lora_alpha=grow * config.lora_alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()},
        init_lora_weights=True)
    return with_leaves(params, updates), plain_config
