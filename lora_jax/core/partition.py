"""`split` a params tree into trainable and frozen parts, and `combine` them again.

Both parts have the structure of the whole tree, with `None` where a leaf belongs to the other
part (equinox's partition/combine idea), so either can be passed to `jax.grad`, optax or a
checkpointer on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_jax.core.config import AdapterConfig
from lora_jax.core.record import LoraRecord
from lora_jax.core.saved import is_original
from lora_jax.core.targets import saved_name_match

Tree = Mapping[str, Any]


def trainable_mask(params: Tree, config: AdapterConfig) -> dict[str, Any]:
    """A tree of bools: True for the arrays the records say train (`LoraRecord.trained`), for
    biases per `config.bias`, and for every leaf of a module in `config.modules_to_save`
    (peft's rule: the module's name ends with an entry) but a saved table's frozen original
    (`lora_jax.core.saved`); records are always frozen."""

    def visit(node: Tree, path: str, saved: bool) -> dict[str, Any]:
        trained = {n for v in node.values() if isinstance(v, LoraRecord) for n in v.trained}
        adapted = any(isinstance(v, LoraRecord) for v in node.values())
        out: dict[str, Any] = {}
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            if isinstance(value, Mapping):
                keep = saved or saved_name_match(config.modules_to_save, child)
                out[key] = visit(value, child, keep)
            else:
                out[key] = not isinstance(value, LoraRecord) and (
                    (saved and not is_original(key))
                    or key in trained
                    or (key == "bias" and (config.bias == "all"
                                           or (config.adapted_biases and adapted)))
                )
        return out

    return visit(params, "", False)


def select(params: Tree, mask: Tree, keep: bool) -> dict[str, Any]:
    """`params` with None where `mask` (a `trainable_mask`) is not `keep`."""
    return {
        key: select(value, mask[key], keep) if isinstance(value, Mapping)
        else (value if mask[key] == keep else None)
        for key, value in params.items()
    }


def split(params: Tree, config: AdapterConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainable, frozen): two trees shaped like `params` with `None` holes.

    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from lora_jax import LoraConfig, inject
    >>> config = LoraConfig(r=2, target_modules=["dense"])
    >>> params = {"dense": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]}
    >>> params = inject(params, config, jax.random.key(1))
    >>> trainable, frozen = split(params, config)
    >>> trainable["dense"]["kernel"] is None, frozen["dense"]["lora_A"] is None
    (True, True)
    """
    mask = trainable_mask(params, config)
    return select(params, mask, True), select(params, mask, False)


def combine(*trees: Tree) -> dict[str, Any]:
    """The inverse of `split`: at every position exactly one tree holds the leaf.

    Raises naming the path where the trees' structures differ or two trees both hold a leaf.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> config = lora_jax.LoraConfig(r=2, target_modules=".*")
    >>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
    ...                          jax.random.key(1))
    >>> trainable, frozen = lora_jax.split(params, config)
    >>> trainable["kernel"], frozen["lora_A"]  # each leaf in one half, None in the other
    (None, None)
    >>> jax.tree.structure(combine(trainable, frozen)) == jax.tree.structure(params)
    True
    """
    return _combine(trees, "")


def _combine(trees: tuple[Any, ...], path: str) -> Any:
    present = [t for t in trees if t is not None]
    if not present:
        return None
    if all(isinstance(t, Mapping) for t in present):
        keys = list(present[0])
        for tree in present[1:]:
            if set(tree) != set(keys):
                raise ValueError(
                    f"combine: the trees differ at {path or '<root>'!r}: keys "
                    f"{sorted(set(keys) ^ set(tree))} are in one tree but not the other (were "
                    "they split from the same params?)"
                )
        return {k: _combine(tuple(t[k] for t in present), f"{path}.{k}" if path else k)
                for k in keys}
    if len(present) > 1:
        raise ValueError(
            f"combine: more than one tree holds a value at {path or '<root>'!r}; each "
            "position must be None in all trees but one"
        )
    return present[0]
