"""`weighted_adapter`: one new LoRA adapter from a weighted combination of several, as peft's
`LoraModel.add_weighted_adapter` (the combination types: docs/guides/many_adapters.md).

The adapters' scales are folded into the new factors, so the result's scale is 1 (`r = lora_alpha
= new rank`, as in peft). The linear family combines A and B separately, with `sign(c) sqrt(|c|)`
on A and `sqrt(|c|)` on B, `c = weight * scale`. A module only some adapters adapt is combined
from those (the others count as zero); scanned stacks combine per layer, as peft does per module;
`cat` packs, per layer, the adapters' own columns first and pads with zeros to the sum of their
largest ranks, as peft does. `svd` works from the stacked factors (QR of each side, then the SVD
of a small `R x R` core, R the sum of ranks) and never forms an `in x out` matrix; the other
`*_svd` types prune elements of the deltas, so they form each module's `in x out` delta.

Differences from peft 0.21, on purpose: its combined adapter keeps `use_rslora` and so is scaled
by `sqrt(new rank)` (peft issue #3761, fixed upstream in #3449), here the scale is 1; DoRA
adapters are refused (peft keeps the base weight's norm as the combined magnitude, #3761). peft's
`svd_full_matrices` / `svd_driver` only change how the SVD is computed, not its leading triplets,
so they are not taken. Singular vectors have arbitrary signs, which `svd_clamp`'s quantile depends
on: clamped factors can differ from peft's (the unclamped ones agree); where a delta has fewer
than `svd_rank` singular values the extra columns are zero (peft's are arbitrary null-space
vectors).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import variants
from lora_jax.core.config import LoraConfig
from lora_jax.core.factors import Layout, factor_shapes, pad_rank
from lora_jax.core.record import Adapted, check_same_base, record_name, without_adapters
from lora_jax.core.targets import unbox, with_leaves
from lora_jax.multi.adapters import _by_weight

_FACTORED = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*_FACTORED, "cat", *_SVD)


def weighted_adapter(
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """(params with one new adapter, its LoraConfig) combining `adapters` with `weights`.

    `adapters` are params trees of one base model, each with one plain LoRA adapter (from
    `inject` or `load_peft`; targets, ranks and scales may differ). The result is the base with
    the combined adapter (records of scale 1), ready for `wrap`, `merge` and `save_peft` with
    the returned config. `combination_type` is one of `COMBINATION_TYPES` (peft's names and
    defaults): `svd_rank` (default: the largest adapter rank) and `svd_clamp` for the SVD types,
    `density` (fraction kept, required) for the pruning ones, `majority_sign_method` ("total" or
    "frequency") for the TIES ones, and `key` for the random masks of `dare_*` (they cannot
    match PyTorch's generator; density >= 1 prunes nothing, as in peft). Weights may be negative.
    A single adapter is always combined linearly, as in peft.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 6))
    >>> base = model.init(jax.random.key(0), x)["params"]
    >>> make = lambda r, seed: lora_jax.inject(base, lora_jax.LoraConfig(
    ...     r=r, target_modules=".*", init_lora_weights=False), jax.random.key(seed))
    >>> params, config = weighted_adapter([make(2, 1), make(3, 2)], [0.5, 0.5], "cat")
    >>> params["lora_A"].shape, config.r
    ((6, 5), 5)
    """
    weights = [float(w) for w in weights]
    if not adapters:
        raise ValueError("weighted_adapter: `adapters` is empty; pass at least one params tree")
    if len(weights) != len(adapters):
        raise ValueError(f"weighted_adapter: {len(adapters)} adapters but {len(weights)} weights; "
                         "pass one weight per adapter")
    for i, w in enumerate(weights):
        if not np.isfinite(w):
            raise ValueError(f"weighted_adapter: weights[{i}] is {w}; every weight must be a "
                             "finite number")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"weighted_adapter: unknown combination_type {combination_type!r}; "
                         f"one of {list(COMBINATION_TYPES)}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"weighted_adapter: majority_sign_method {majority_sign_method!r} must "
                         "be 'total' or 'frequency'")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"weighted_adapter: svd_rank={svd_rank!r} must be a positive int")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"weighted_adapter: svd_clamp={svd_clamp!r} is a quantile in [0, 1]")
    if len(adapters) == 1:
        combination_type = "linear"
    method = "linear" if combination_type in ("svd", "cat") else \
        combination_type.removesuffix("_svd")
    if method != "linear":
        if density is None or not 0 <= density <= 1:
            raise ValueError(f"weighted_adapter: {combination_type!r} prunes: pass density (the "
                             f"fraction of values kept, in [0, 1]); got {density!r}")
        if method.startswith("dare") and density < 1 and key is None:
            raise ValueError(f"weighted_adapter: {combination_type!r} draws random masks: pass "
                             "key=jax.random.key(...)")

    found = [_by_weight(tree) for tree in adapters]
    for number, tree in enumerate(adapters[1:], 1):
        check_same_base(adapters[0], tree, f"weighted_adapter: adapter {number}")
    modules = list(dict.fromkeys(k for by_module in found for k in by_module))
    for where in modules:
        _check_record(where, [by_module.get(where) for by_module in found])
    ranks = [max(item.record.rank for item in by_module.values()) for by_module in found]
    if combination_type in _FACTORED:
        _check_one_rank(found)
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)

    prune = _Prune(method, 1.0 if density is None else float(density), majority_sign_method)
    updates: dict[str, dict[str, Any]] = {}
    for number, where in enumerate(modules):
        items = [by_module.get(where) for by_module in found]
        first = next(item for item in items if item is not None)
        layout, shape = first.record.layout, tuple(unbox(first.weight).shape)
        a, b = _combine_module(
            tuple(None if item is None else item.factors for item in items),
            jnp.asarray([0.0 if item is None else item.record.scale for item in items]),
            jnp.asarray(weights), None if combination_type != "cat" else
            jnp.asarray(_cat_order(items, max(ranks), shape[:layout.stacked])[..., :new_rank]),
            jax.random.fold_in(jax.random.key(0) if key is None else key, number),
            combination_type=combination_type, layout=layout, shape=shape,
            width=max(ranks), new_rank=new_rank, clamp=svd_clamp, prune=prune)
        dtype = first.factors[0].dtype
        updates.setdefault(first.path, {}).update({
            first.record.keys["lora_A"]: a.astype(dtype),
            first.record.keys["lora_B"]: b.astype(dtype),
            record_name(first.record.weight): dataclasses.replace(
                first.record, rank=new_rank, scale=1.0, layers=_layers(items))})
    base = without_adapters(adapters[0])
    config = LoraConfig(r=new_rank, lora_alpha=new_rank,
                        target_modules=sorted({item.target for by_module in found
                                               for item in by_module.values()}),
                        lora_dropout=next(iter(found[0].values())).record.dropout)
    return with_leaves(base, updates), config


# --- checks ---------------------------------------------------------------------------------------

def _check_record(where: tuple[str, str], items: Sequence[Adapted | None]) -> None:
    present = [(n, item) for n, item in enumerate(items) if item is not None]
    target = present[0][1].target
    for n, item in present:
        record = item.record
        variants.of(record).check("combinations", f"weighted_adapter: {target!r} of adapter {n}")
        if record.materialised:
            raise ValueError(f"weighted_adapter: {target!r} of adapter {n} adapts a parameter by "
                             "name (target_parameters), which peft's add_weighted_adapter refuses")
        if record.adapters or record.scale is None:
            raise ValueError(f"weighted_adapter: {target!r} of adapter {n} holds an adapter set "
                             "(or an adapter selected from one, with array scales); take each "
                             "member as it went in with lora_jax.adapters.adapter(aset, name)")
        if record.layout != present[0][1].record.layout:
            raise ValueError(f"weighted_adapter: {target!r} is laid out as {record.layout} in "
                             f"adapter {n} but {present[0][1].record.layout} in adapter "
                             f"{present[0][0]}; combine adapters of one model")


def _check_one_rank(found: Sequence[Mapping[tuple[str, str], Adapted]]) -> None:
    ranks = {(n, item.target): item.record.rank
             for n, by_module in enumerate(found) for item in by_module.values()}
    if len(set(ranks.values())) > 1:
        (n0, t0), r0 = next(iter(ranks.items()))
        (n, target), r = next((k, v) for k, v in ranks.items() if v != r0)
        raise ValueError(
            f"weighted_adapter: linear, ties, dare and magnitude_prune combine A and B "
            f"separately, which needs one rank: adapter {n} has r={r} at {target!r}, adapter "
            f"{n0} r={r0} at {t0!r}; use combination_type 'cat' or 'svd' for different ranks")


# --- one adapted weight ---------------------------------------------------------------------------

def _layers(items: Sequence[Adapted | None]) -> tuple[int, ...] | None:
    """The adapted layers of a scanned stack: those of any adapter (None: all)."""
    layers: set[int] = set()
    for item in items:
        if item is not None:
            if item.record.layers is None:
                return None
            layers.update(item.record.layers)
    return tuple(sorted(layers))


def _cat_order(items: Sequence[Adapted | None], width: int, scanned: tuple[int, ...]
               ) -> np.ndarray:
    """`[*scanned, n * width]`: the order of the concatenated columns (each adapter's padded to
    `width`) putting, per layer, the adapters' own columns first (in adapter order) and the
    zero padding last, as peft packs them."""
    real = np.zeros((*scanned, len(items), width), bool)
    for n, item in enumerate(items):
        if item is not None:
            present = np.ones(scanned, bool)
            if item.record.layers is not None:  # the other layers hold zeros
                present[np.setdiff1d(np.arange(scanned[0]), item.record.layers)] = False
            real[..., n, :item.record.rank] = present[..., None]
    return np.argsort(~real.reshape(*scanned, -1), axis=-1, kind="stable")


class _Prune(NamedTuple):
    method: str  # linear, ties, dare_linear, dare_ties, magnitude_prune
    density: float
    sign: str  # majority_sign_method


@functools.partial(jax.jit, static_argnames=("combination_type", "layout", "shape", "width",
                                             "new_rank", "clamp", "prune"))
def _combine_module(factors: tuple[tuple[jax.Array, jax.Array] | None, ...], scales: jax.Array,
                    weights: jax.Array, order: jax.Array | None, key: jax.Array, *,
                    combination_type: str, layout: Layout, shape: tuple[int, ...],
                    width: int, new_rank: int, clamp: float | None, prune: _Prune
                    ) -> tuple[jax.Array, jax.Array]:
    """The new A, B of one weight from each adapter's (A, B) (None: not adapted there), scale
    and weight; the factors are zero-padded to rank `width` and stacked."""
    n_stack = len(layout.split(shape)[0])
    zeros = tuple(jnp.zeros(s, jnp.float32) for s in factor_shapes(shape, layout, width))
    padded = [zeros if pair is None else pad_rank(pair[0].astype(jnp.float32),
                                                  pair[1].astype(jnp.float32), layout, width)
              for pair in factors]
    a, b = (jnp.stack(side) for side in zip(*padded, strict=True))
    coefficients = weights * scales
    if combination_type in _FACTORED:
        root = jnp.sqrt(jnp.abs(coefficients))
        signed = jnp.where(coefficients < 0, -root, root)
        new_a, new_b = (_combine(_per_layer(f, layout.stacked), c, jax.random.fold_in(key, side),
                                 prune).reshape(f.shape[1:])
                        for side, (f, c) in enumerate(((a, signed), (b, root))))
        return new_a, new_b
    if order is not None:  # combination_type "cat"
        return _concatenate(a, b, coefficients, order, n_stack, layout.stacked)
    return _svd(a, b, scales, weights, key, n_stack, layout.stacked, new_rank, clamp, prune)


def _per_layer(x: jax.Array, scanned: int) -> jax.Array:
    """`[n, *x]` as `[n, *scanned axes, elements]`: peft prunes each layer's module alone."""
    return x.reshape(*x.shape[:1 + scanned], -1)


def _columns(a: jax.Array, b: jax.Array, coefficients: jax.Array, n_stack: int
             ) -> tuple[jax.Array, jax.Array]:
    """[c_1 A_1 | c_2 A_2 | ...] and [B_1 ; B_2 ; ...] of the stacked `a [n, *stack, ..., r]`
    and `b [n, *stack, r, ...]`."""
    a = a * coefficients.reshape(-1, *[1] * (a.ndim - 1))
    a = jnp.moveaxis(a, 0, -2).reshape(*a.shape[1:-1], -1)
    b = jnp.moveaxis(b, 0, n_stack).reshape(*b.shape[1:n_stack + 1], -1, *b.shape[n_stack + 2:])
    return a, b


def _concatenate(a: jax.Array, b: jax.Array, coefficients: jax.Array, order: jax.Array,
                 n_stack: int, scanned: int) -> tuple[jax.Array, jax.Array]:
    """cat: `_columns`, the columns put in `order` (per layer)."""
    a, b = _columns(a, b, coefficients, n_stack)
    lead, total = order.shape[:-1], order.shape[-1]
    a_order = order.reshape(*lead, *[1] * (a.ndim - scanned - 1), total)
    b_order = order.reshape(*lead, *[1] * (n_stack - scanned), total,
                            *[1] * (b.ndim - n_stack - 1))
    return (jnp.take_along_axis(a, a_order, axis=-1),
            jnp.take_along_axis(b, b_order, axis=n_stack))


def _svd(a: jax.Array, b: jax.Array, scales: jax.Array, weights: jax.Array, key: jax.Array,
         n_stack: int, scanned: int, rank: int, clamp: float | None, prune: _Prune
         ) -> tuple[jax.Array, jax.Array]:
    """The rank-`rank` SVD factors of the combined delta, as peft: with the delta in PyTorch's
    `[out, in]` layout = U S Vh, B = (U S)^T and A = Vh^T, both clipped at the `clamp` quantile
    of their entries. An adapter without this weight has zero factors (and scale)."""
    stack, fan_in, fan_out = a.shape[1:n_stack + 1], a.shape[n_stack + 1:-1], \
        b.shape[n_stack + 2:]
    # [n, *stack, in, r] and [n, *stack, r, out]
    a = a.reshape(a.shape[0], *stack, -1, a.shape[-1])
    b = b.reshape(*b.shape[:n_stack + 2], -1)
    hi = jax.lax.Precision.HIGHEST
    t = lambda x: jnp.swapaxes(x, -1, -2)
    if prune.method == "linear":
        # delta^T = B_cat^T A_cat^T = Qb (Rb Ra^T) Qa^T: the SVD of the small core, no in x out.
        a_cat, b_cat = _columns(a, b, weights * scales, n_stack)
        qa, ra = jnp.linalg.qr(a_cat)
        qb, rb = jnp.linalg.qr(t(b_cat))
        u, s, vh = jnp.linalg.svd(jnp.matmul(rb, t(ra), precision=hi), full_matrices=False)
        u, vh = jnp.matmul(qb, u, precision=hi), jnp.matmul(vh, t(qa), precision=hi)
    else:
        deltas = jnp.matmul(a, b, precision=hi) * scales.reshape(-1, *[1] * (a.ndim - 1))
        delta = _combine(_per_layer(deltas, scanned), weights, key, prune)
        u, s, vh = jnp.linalg.svd(t(delta.reshape(deltas.shape[1:])), full_matrices=False)
    u = u[..., :rank] * s[..., None, :rank]
    vh = vh[..., :rank, :]
    if clamp is not None:
        flat = jnp.concatenate([u.reshape(*stack, -1), vh.reshape(*stack, -1)], axis=-1)
        bound = jnp.quantile(flat, clamp, axis=-1)[..., None, None]
        u, vh = jnp.clip(u, -bound, bound), jnp.clip(vh, -bound, bound)
    missing = rank - u.shape[-1]  # fewer singular values than the rank: zero columns
    a = jnp.pad(t(vh), [(0, 0)] * (vh.ndim - 1) + [(0, missing)])
    b = jnp.pad(t(u), [(0, 0)] * (u.ndim - 2) + [(0, missing), (0, 0)])
    return a.reshape(*stack, *fan_in, rank), b.reshape(*stack, rank, *fan_out)


# --- peft's merge_utils on stacked tensors --------------------------------------------------------

def _combine(tensors: jax.Array, weights: jax.Array, key: jax.Array, prune: _Prune
             ) -> jax.Array:
    """Combine `tensors [n, *layers, elements]` with `weights [n]` by `prune.method`."""
    method, density = prune.method, prune.density
    if method in ("ties", "magnitude_prune") and density < 1:
        tensors = _magnitude_prune(tensors, density)
    if method in ("dare_linear", "dare_ties") and density < 1:
        keep = jax.random.bernoulli(key, density, tensors.shape)
        tensors = jnp.where(keep, tensors / density, 0.0)
    weighted = tensors * weights.reshape(-1, *[1] * (tensors.ndim - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    signs = jnp.sign(tensors)
    votes = (tensors if prune.sign == "total" else signs).sum(0)
    agree = signs == jnp.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1)


def _magnitude_prune(tensors: jax.Array, density: float) -> jax.Array:
    """Keep the `int(density * elements)` largest magnitudes of each tensor (per layer)."""
    k = int(density * tensors.shape[-1])
    flat = tensors.reshape(-1, tensors.shape[-1])
    _, top = jax.lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], top].set(True)
    return jnp.where(keep, flat, 0.0).reshape(tensors.shape)
