"""Adapter methods behind one interface (`Variant`, see `lora_jax.variants.base`), and their
registry: a record names its variant (`LoraRecord.variant`), a config asks for one.

A new method is one file here: its config (an `AdapterConfig` dataclass with peft's field
names), a `Variant` subclass (its `Leaf`s, `init`, `forward`, `merge`, what it does not
support, its peft fields and keys) and `register_variant(TheVariant())`; plus its name in the
import line below and its config in `lora_jax/__init__.py`. Inject, wrap (both frontends),
merge, split / optimizer / counting, sharding and peft files then take it as they take LoRA.
"""

from __future__ import annotations

from typing import Any

from lora_jax.variants.base import Leaf, Variant

_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make `variant` known by its name (a later one of the same name wins).

    >>> register_variant(named("lora")) is named("lora")  # each variant's file does this
    True
    """
    _VARIANTS[variant.name] = variant
    return variant


def named(name: str) -> Variant:
    """The variant called `name` (a record's `variant`).

    >>> type(named("dora")).__name__
    'Dora'
    """
    if name not in _VARIANTS:
        raise ValueError(f"unknown adapter variant {name!r}; known: {sorted(_VARIANTS)}")
    return _VARIANTS[name]


def of(record: Any) -> Variant:
    """The variant of a `LoraRecord`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> config = lora_jax.VeraConfig(r=2, target_modules=".*")
    >>> params = lora_jax.inject(nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 4)))["params"],
    ...                          config, jax.random.key(1))
    >>> from lora_jax.core.record import record_name
    >>> of(params[record_name("kernel")]).name
    'vera'
    """
    return named(record.variant)


def for_config(config: Any) -> Variant:
    """The variant a config asks for (e.g. `LoraConfig(use_dora=True)`: DoRA).

    >>> from lora_jax import LoKrConfig, LoraConfig
    >>> [for_config(c).name for c in (LoraConfig(), LoraConfig(use_dora=True), LoKrConfig())]
    ['lora', 'dora', 'lokr']
    """
    found = [v for v in _VARIANTS.values() if v.accepts(config)]
    if len(found) != 1:
        raise ValueError(f"{type(config).__name__} asks for {len(found)} adapter variants "
                         f"({[v.name for v in found]}); it must ask for one")
    return found[0]


def registered() -> tuple[Variant, ...]:
    """Every registered variant.

    >>> sorted(v.name for v in registered())
    ['dora', 'lokr', 'lora', 'vera']
    """
    return tuple(_VARIANTS.values())


# Each variant's file registers it (a new variant: one name here).
from lora_jax.variants import dora, lokr, lora, vera  # noqa: E402, F401, I001

__all__ = ["Leaf", "Variant", "for_config", "named", "of", "register_variant",
           "registered"]
