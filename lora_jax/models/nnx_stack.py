"""Layer stacks and HF weights for the NNX reference models (`nnx_gpt2`, `nnx_llama`).

A stack is an `nnx.List` of blocks (paths `transformer.h.0.attn.c_attn`: peft's names as they
are) or, with `scan_layers=True`, one block made by `nnx.vmap` whose params carry a leading layer
axis (`transformer.h.attn.c_attn`), run by `nnx.scan` and, with `remat=True`, `nnx.remat`.
Weights load through the linen models' HF loaders: the NNX params dict is the linen one with list
elements `h_0` read as `h.0`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax.numpy as jnp
from flax import nnx

from lora_jax.core.targets import LIST_ELEMENT

M = TypeVar("M", bound=nnx.Module)


def make_stack(create: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs,
               scan: bool) -> nnx.Module:
    """`n` blocks from `create(rngs)`: an nnx.List, or one nnx.vmap-stacked block."""
    if not scan:
        return nnx.List([create(rngs) for _ in range(n)])

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs: nnx.Rngs) -> nnx.Module:
        return create(rngs)

    return stacked(rngs)


def run_stack(stack: nnx.Module, x: Any, *broadcast: Any, remat: bool) -> Any:
    """`x` through every block of a `make_stack` stack, `block(x, *broadcast)`."""
    if isinstance(stack, nnx.List):
        for block in stack:
            x = block(x, *broadcast)
        return x

    def body(x: Any, block: nnx.Module, *broadcast: Any) -> Any:
        return block(x, *broadcast)

    if remat:
        body = nnx.remat(body)
    run = nnx.scan(body, in_axes=(nnx.Carry, 0, *[None] * len(broadcast)), out_axes=nnx.Carry)
    return run(x, stack, *broadcast)


def from_linen_params(params: Mapping[str, Any], stacks: Sequence[str],
                      prefix: str = "") -> dict[str, Any]:
    """A linen reference model's params with the list elements `h_0, h_1` of the `stacks`
    (e.g. `transformer.h`) grouped as `h: {"0", "1"}`: the NNX model's pure dict (scanned stacks
    are the same in both)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        m = LIST_ELEMENT.fullmatch(key)
        name, element = key, None
        if m is not None and (f"{prefix}.{m[1]}" if prefix else m[1]) in stacks:
            name, element = m[1], m[2]
        child = f"{prefix}.{name}" if prefix else name
        if isinstance(value, Mapping):
            value = from_linen_params(value, stacks, child)
        if element is not None:
            out.setdefault(name, {})[element] = value
        else:
            out[key] = value
    return out


def load(model: M, linen_params: Mapping[str, Any], stacks: Sequence[str]) -> M:
    """Set `model`'s params from a linen reference model's params (in place); returns it."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, from_linen_params(linen_params, stacks))
    nnx.update(model, state)
    return model


def causal_mask(attention_mask: Any | None) -> Any | None:
    """[B, 1, 1, S] boolean keep-mask from HF's 0/1 attention_mask (None: none)."""
    return None if attention_mask is None else jnp.asarray(attention_mask, bool)[:, None, None, :]
