"""`modules_to_save` on an embedding table: the lookups train the table, a tied head keeps the
original (as in peft, whose `ModulesToSaveWrapper` keeps the frozen original beside the trained
copy). The untouched table stays as a frozen leaf `embedding_original`, which a tied head
(`Embed.attend`) reads in `wrap`; merged params have one table, the trained one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_jax.core.config import AdapterConfig
from lora_jax.core.targets import iter_modules, saved_name_match, with_leaves, without_leaves

_SUFFIX = "_original"
_TABLES = ("embedding",)


def original_name(weight: str) -> str:
    """The leaf name of the frozen original beside a saved table.

    >>> original_name("embedding")
    'embedding_original'
    """
    return weight + _SUFFIX


def table_of(name: str) -> str | None:
    """The table a leaf name is the frozen original of, or None if it is none.

    >>> table_of("embedding_original"), table_of("embedding")
    ('embedding', None)
    """
    return next((t for t in _TABLES if name == original_name(t)), None)


def is_original(name: str) -> bool:
    """Whether a leaf name is a saved table's frozen original (never trained, never saved)."""
    return table_of(name) is not None


def keep_originals(params: Mapping[str, Any], config: AdapterConfig,
                   base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`params` with `embedding_original` beside every table of a module in
    `config.modules_to_save`, taken from `base` (default: `params` itself; no copy is made).

    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraConfig
    >>> params = {"wte": {"embedding": jnp.ones((5, 2))}, "h": {"kernel": jnp.ones((2, 2))}}
    >>> sorted(keep_originals(params, LoraConfig(target_modules=["h"],
    ...                                          modules_to_save=["wte"]))["wte"])
    ['embedding', 'embedding_original']
    """
    base_modules = dict(iter_modules(params if base is None else base, leaves=_TABLES))
    additions = {path: {original_name(t): base_modules[path][t] for t in _TABLES
                        if t in module and original_name(t) not in module}
                 for path, module in iter_modules(params, leaves=_TABLES)
                 if saved_name_match(config.modules_to_save, path) and path in base_modules}
    return with_leaves(params, additions) if any(additions.values()) else dict(params)


def originals(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{module path: {original leaf name: value}} of every saved table's original."""
    return {path: {k: v for k, v in module.items() if is_original(k)}
            for path, module in iter_modules(params, leaves=None)
            if any(is_original(k) for k in module)}


def drop_originals(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` without the originals (the model's own tree: one table, the trained one)."""
    found = originals(params)
    return without_leaves(params, {(p, k) for p, leaves in found.items() for k in leaves}) \
        if found else dict(params)
