"""Tied output heads, however a model spells them: which embedding tables a traced forward
contracts over their feature axis (`h @ table.T`, `Embed.attend`, a head `.apply`d with the
table), as opposed to a lookup (a gather, or a one-hot matmul over the vocabulary axis).

>>> import jax, jax.numpy as jnp
>>> table, ids = jnp.ones((7, 3)), jnp.array([1, 2])
>>> forward = lambda t: t[ids] @ t.T       # a lookup, then a head tied to the same table
>>> sorted(contracted(jax.make_jaxpr(forward)(table), {0: ("wte", 1)}))
['wte']
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Primitives whose output is a row read of the table, not the table.
_LOOKUPS = frozenset({"gather", "dynamic_slice", "dynamic_index_in_dim", "slice"})
# {var: (table, its feature axis in this var, or None once unknown)}
_Taint = dict[Any, tuple[str, int | None]]


def contracted(closed_jaxpr: Any, tables: Mapping[int, tuple[str, int]]) -> set[str]:
    """The names of `tables` ({input position: (name, feature axis)}) that `closed_jaxpr`
    contracts over their feature axis in a `dot_general`."""
    invars = closed_jaxpr.jaxpr.invars
    found: set[str] = set()
    _walk(closed_jaxpr.jaxpr, {invars[i]: named for i, named in tables.items()}, found)
    return found


def _subjaxprs(params: Mapping[str, Any]) -> Iterator[Any]:
    for key, value in params.items():
        if key == "cond_jaxpr":  # a while loop's predicate: no matmul, inputs not aligned
            continue
        for item in value if isinstance(value, tuple | list) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def _walk(jaxpr: Any, taint: _Taint, found: set[str]) -> list[tuple[str, int | None] | None]:
    """Propagate the tables' taint through `jaxpr`, adding to `found`; the outputs' taint."""
    for eqn in jaxpr.eqns:
        ins = [(k, taint[v]) for k, v in enumerate(eqn.invars) if _hashable(v) and v in taint]
        if not ins:
            continue
        name = eqn.primitive.name
        if name in _LOOKUPS:
            continue
        if name == "dot_general":
            (contract_lhs, contract_rhs), _ = eqn.params["dimension_numbers"]
            for k, (table, axis) in ins:
                if k < 2 and axis is not None and axis in (contract_lhs, contract_rhs)[k]:
                    found.add(table)
            continue
        subs = list(_subjaxprs(eqn.params))
        if subs:  # jit, remat, scan, cond, while, custom_jvp: invars align with the last ones
            for sub in subs:
                offset = len(eqn.invars) - len(sub.invars)
                inner = {sub.invars[k - offset]: t for k, t in ins if k >= offset}
                outs = _walk(sub, inner, found)
                for var, out in zip(eqn.outvars, outs[-len(eqn.outvars):], strict=False):
                    if out is not None:
                        taint[var] = out
            continue
        for var in eqn.outvars:
            for k, (table, axis) in ins:
                taint[var] = (table, _axis_after(eqn, eqn.invars[k], axis, var))
    return [taint.get(v) if _hashable(v) else None for v in jaxpr.outvars]


def _axis_after(eqn: Any, var: Any, axis: int | None, out: Any) -> int | None:
    """Where the feature axis of `var` is in `out` (None when `eqn` moves it unknowably)."""
    if axis is None:
        return None
    if eqn.primitive.name == "transpose":
        return list(eqn.params["permutation"]).index(axis)
    return axis if var.aval.shape == out.aval.shape else None  # elementwise, casts


def _hashable(var: Any) -> bool:
    return not hasattr(var, "val")  # a Literal holds a value and is not a graph variable
