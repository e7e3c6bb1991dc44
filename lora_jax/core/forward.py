"""The one forward of an adapted layer, for every frontend and variant.

A frontend (the linen interceptor, the NNX adapted class) only reads the layer's variables and
calls the layer itself; it hands `forward` a `Call` (the rule, the module, the call's arguments,
the layer's own output, its weight and bias) with the record's leaves. Here, once: LoRA dropout
on the input (the key drawn only when it is used), the delta in float32 under a float16 output,
the variant's term (`Variant.forward`, through `Call.product` and `Call.base`), the scale put on
B, and a mixed batch of an adapter set (one adapter per example, by one of `STRATEGIES`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import variants
from lora_jax.core.factors import Layout, broadcast_scale, dropout, project
from lora_jax.core.merge import fold
from lora_jax.core.record import LoraRecord
from lora_jax.core.rules import NotAdaptable, Rule

TIED_HEAD_WARNING = (
    "{path!r} is adapted and also used as a tied output head ({how}). As in peft, the "
    "adapter changes only the lookup, but merge() changes the shared table, so the merged model "
    "differs from the adapted one in its head. Adapt the embedding only if you keep it unmerged."
)
MATERIALISE_WARNING = (
    "{path!r} ({shape}) has no layer rule, so its adapted weight W + scale * A B is formed on "
    "every call: {size:,d} extra values and an in x out matmul per step. Register a Rule for "
    "its module class (lora_jax.register_rule) to add the low-rank delta instead"
)
Strategy = Literal["gather", "onehot", "ragged"]
STRATEGIES: tuple[str, ...] = ("gather", "onehot", "ragged")


@dataclasses.dataclass
class Call:
    """One call of an adapted layer, as its frontend supplies it.

    `weight` is the weight as the module sees it (stacked axes sliced off), `bias` its bias or
    None, `rng()` the LoRA dropout key when training (else None; drawn only if dropout applies),
    `ids` the examples' adapter slots for an adapter set, `where` the layer's name in errors.
    Set on construction: `x` (the input after dropout, in `dtype`, the delta's dtype),
    `dropped` (whether dropout ran) and `layout` (the record's, for one layer).
    """

    rule: Rule
    module: Any
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    out: jax.Array
    weight: Any
    bias: Any
    record: LoraRecord
    rng: Callable[[], jax.Array | None]
    where: str
    ids: jax.Array | None = None
    strategy: Strategy = "gather"

    def __post_init__(self) -> None:
        record, rule = self.record, self.rule
        if record.adapters and self.ids is None:
            raise ValueError(f"{self.where} holds an adapter set: call with adapter_ids=[one slot "
                             "per example] or pass lora_jax.adapters.select(params, slot)")
        # float16's range (65504) is small enough for x @ A to overflow where the base output
        # and the merged weight are finite: compute the delta in float32, add it once.
        self.dtype = jnp.float32 if self.out.dtype == jnp.float16 else self.out.dtype
        self.layout = dataclasses.replace(record.layout, stacked=0)
        self.x = rule.inputs(self.args, self.kwargs)
        key = self.rng() if rule.dropout and record.dropout > 0 else None
        self.dropped = key is not None
        if rule.dropout:
            self.x = dropout(jnp.asarray(self.x, self.dtype), record.dropout, key)

    def product(self, a: jax.Array, b: jax.Array, scale: Any = 1.0) -> jax.Array:
        """`scale * (x A) B` by the rule's low-rank product (the scale put on B `[r, out]`, the
        cheapest place); for an adapter set each example's own adapter and scale."""
        if self.record.adapters:
            return _mixed(self, a, b, scale)
        b = b * broadcast_scale(scale, b.ndim)
        return self.rule.delta(self.module, self.x, a.astype(self.dtype), b.astype(self.dtype),
                               self.args, self.kwargs)

    def base(self) -> jax.Array:
        """The layer's product without its bias: recomputed on the dropped input when dropout
        ran (as peft's DoRA does), else the output less the bias."""
        if self.dropped:
            # inject refuses a variant that recomputes the base under dropout on a rule without
            # one (Variant.recomputes_base)
            assert self.rule.base is not None
            return self.rule.base(self.module, self.x, self.weight.astype(self.out.dtype),
                                  self.args, self.kwargs)
        return self.out if self.bias is None else self.out - self.bias


def forward(call: Call, leaves: Mapping[str, jax.Array], scale: Any) -> jax.Array:
    """The adapted layer's output: its own output plus its variant's term (`leaves` by the
    variant's leaf names, `scale` the record's or its array scale)."""
    term = variants.of(call.record).forward(call, leaves, scale)
    return call.out + term.astype(call.out.dtype)


def check_reading(call: Call, hint: str) -> None:
    """Raise unless the factors were made for the reading the rule gives on this call."""
    weight, stored = call.weight, call.record.layout
    try:
        layout = call.rule.layout(call.module, weight, call.args, dict(call.kwargs))
        inner = stored.roles(stored.stacked + weight.ndim)[stored.stacked:]
        how = None if stored.kind == layout.kind and inner == layout.roles(weight.ndim) else (
            f"its rule reads the weight as {layout.roles(weight.ndim)!r} (i: input, o: output, "
            f"b: kept axes) but its factors were made for {inner!r}")
    except (NotAdaptable, ValueError) as e:
        how = str(e)
    if how:
        raise ValueError(f"{call.where}: {how}. Inject with layouts={hint}(model, "
                         "*example_inputs) so inject reads each layer the way its rule does")


def materialised(path: str, record: LoraRecord, weight: Any, leaves: Mapping[str, Any],
                 scale: Any, layout: Layout | None = None, stacklevel: int = 2) -> jax.Array:
    """`fold`'s W + scale * A B (differentiable in the factors) for a weight adapted without a
    layer rule, formed on every call: warned with MATERIALISE_WARNING at `stacklevel`."""
    warnings.warn(MATERIALISE_WARNING.format(path=path, shape=tuple(weight.shape),
                                             size=weight.size), stacklevel=stacklevel + 1)
    return fold(record, weight, leaves, scale, layout)


# --- mixed batches: one adapter per example, inside a layer -------------------------------------

def check_ids(ids: Any) -> jax.Array:
    """`ids` as int32 [batch]; raises on a float / bool dtype, a wrong shape or (when concrete)
    an id below -1 (`_mixed` refuses one >= K). Under `jax.jit` the values are unknown when
    tracing: an out-of-range id then runs that example on the base alone, as -1 does."""
    array = jnp.asarray(ids)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be integers (one adapter slot per example, -1 for "
                         f"none), got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"adapter_ids must have shape [batch], one id per example, got "
                         f"{array.shape}")
    if not isinstance(array, jax.core.Tracer) and bool(jnp.any(array < -1)):
        raise ValueError(f"adapter_ids holds {int(array.min())}; ids are slots 0..K-1, or -1 "
                         "for the base alone")
    return array.astype(jnp.int32)


def _mixed(call: Call, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """`scale * (x A) B` of one layer for a batch whose example n uses adapter `ids[n]`.

    `a [K, *in, r]`, `b [K, r, *out]`, `scale [K]` (one layer's slice of a set); `x`'s leading
    axis is the batch. "gather" takes each example's factors and runs the rule per example
    (any layer); "onehot" projects onto all K adapters' ranks at once and masks each example's
    block (vLLM-TPU's einsum form); "ragged" sorts the examples by adapter and runs grouped
    matmuls (`jax.lax.ragged_dot`, S-LoRA / Punica's form). The last two need a plain matmul
    layer (`Rule.matmul`); others fall back to "gather".
    """
    rule, module, x, ids, strategy = call.rule, call.module, call.x, call.ids, call.strategy
    args, kwargs = call.args, call.kwargs
    assert ids is not None  # Call refuses an adapter set called without adapter_ids
    a, b = a.astype(call.dtype), b.astype(call.dtype)
    k = a.shape[0]
    if x.shape[0] != ids.shape[0]:
        raise ValueError(f"adapter_ids has {ids.shape[0]} entries but this layer's input has "
                         f"batch {x.shape[0]}: pass one id per example")
    # numpy: inside nn.scan a jnp op on the concrete ids would give a tracer
    if not isinstance(ids, jax.core.Tracer) and (top := int(np.asarray(ids).max())) >= k:
        raise ValueError(f"adapter_ids holds {top} but {call.where} holds {k} "
                         f"adapters: ids are slots 0..{k - 1}, or -1 for the base alone")
    # Each example's slot clipped into range, and its scale: 0 for -1 or an unknown slot.
    on = (ids >= 0) & (ids < k)
    slot = jnp.where(on, ids, 0)
    weight = jnp.where(on, scale[slot], 0.0).astype(b.dtype)
    if strategy == "gather" or not rule.is_matmul(module):
        a_e = jnp.take(a, slot, axis=0)
        b_e = jnp.take(b, slot, axis=0) * broadcast_scale(weight, b.ndim)
        one = lambda xi, ai, bi: rule.delta(module, xi[None], ai, bi, args, kwargs)[0]
        return jax.vmap(one)(x, a_e, b_e)
    precision = getattr(module, "precision", None)
    r, out = a.shape[-1], b.shape[2:]
    if strategy == "onehot":
        a_all = jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], k * r)
        mask = jax.nn.one_hot(slot, k, dtype=b.dtype) * weight[:, None]  # [N, K]
        h = project(x, a_all, precision=precision)
        h = h * jnp.repeat(mask, r, axis=1).reshape((x.shape[0],) + (1,) * (h.ndim - 2) + (-1,))
        return jnp.tensordot(h, b.reshape(k * r, *out), axes=1, precision=precision)
    if strategy != "ragged":
        raise ValueError(f"unknown mixed-batch strategy {strategy!r}; use one of {STRATEGIES}")
    n, d_in = x.shape[0], x.shape[-1]
    tokens = math.prod(x.shape[1:-1])
    group = jnp.where(weight != 0, slot, k)  # examples without an adapter go last, to zeros
    order = jnp.argsort(group)
    sizes = jnp.bincount(group, length=k + 1).astype(jnp.int32) * tokens
    flat = jnp.take(x.reshape(n, tokens, d_in), order, axis=0).reshape(n * tokens, d_in)
    scaled = b * broadcast_scale(scale.astype(b.dtype), b.ndim)
    zeros = lambda t: jnp.concatenate([t, jnp.zeros((1, *t.shape[1:]), t.dtype)])
    low = jax.lax.ragged_dot(flat, zeros(a), sizes, precision=precision)
    delta = jax.lax.ragged_dot(low, zeros(scaled.reshape(k, r, -1)), sizes, precision=precision)
    delta = delta.reshape(n, tokens, -1)[jnp.argsort(order)]
    return delta.reshape(*x.shape[:-1], *out)
