"""Initialisers: how `init_lora_weights` draws A and B, one registry for every value (peft's):
True (A kaiming-uniform, B = 0), False (both random), "gaussian", and those that change the base
weight (inject returns the residual base): "pissa", "pissa_niter_K", "olora", "loftq".

>>> known("pissa_niter_4"), known("svd"), changes_base("olora"), changes_base("gaussian")
(True, False, True, False)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core.factors import MATERIALISE, Layout, factor_shapes, max_rank
from lora_jax.quant import quantize as quantization

Draw = Callable[..., tuple[jax.Array, jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Initialiser:
    """`draw(weight, layout, r, scale, config, key, dtype) -> (A, B, new base or None)` for the
    `init_lora_weights` values `name` (a bool, or a regex fullmatching the str)."""

    name: bool | str
    draw: Draw
    changes_base: bool = False


_INITS: list[Initialiser] = []


def register_init(init: Initialiser) -> Initialiser:
    """Make `init.name` a valid `init_lora_weights` value."""
    _INITS.append(init)
    return init


def _lookup(name: Any) -> Initialiser | None:
    return next((init for init in _INITS if init.name is name or isinstance(init.name, str)
                 and isinstance(name, str) and re.fullmatch(init.name, name)), None)


def _named(name: Any) -> Initialiser:
    init = _lookup(name)
    if init is None:
        raise ValueError(f"init_lora_weights={name!r} is not a known initialiser")
    return init


def known(name: Any) -> bool:
    """Whether `name` is a registered `init_lora_weights` value."""
    return _lookup(name) is not None


def changes_base(name: Any) -> bool:
    """Whether the initialiser `name` replaces the base weight (PiSSA, OLoRA, LoftQ)."""
    return _named(name).changes_base


def initialise(weight: Any, layout: Layout, r: int, scale: float | None, config: Any,
               key: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, Any]:
    """(A, B, new base or None) drawn by `config.init_lora_weights`."""
    return _named(config.init_lora_weights).draw(weight, layout, r, scale, config, key, dtype)


def check(where: str, weight: Any, layout: Layout, values: Any, config: Any) -> None:
    """Raise where an initialiser that changes the base does not apply (with what to do)."""
    init = config.init_lora_weights
    if not changes_base(init):
        return
    if init == "loftq" and layout.stacked and config.layers_to_transform is not None:
        raise ValueError(f"init_lora_weights='loftq' with layers_to_transform on the scanned "
                         f"stack {where!r}: the stack's weight is one quantized leaf; use "
                         "unscanned layers or no layer selection")
    if layout.kind == "embed" or layout.rule == MATERIALISE:
        raise ValueError(f"init_lora_weights={init!r} is not supported for {where!r} "
                         f"({layout.kind}); peft applies it to Dense-like and Conv layers")
    quantized = hasattr(weight, "dequantize")  # lora_jax.quantize's NF4 / int8 weights
    if quantized or not jnp.issubdtype(weight.dtype, jnp.floating):
        raise ValueError(
            f"init_lora_weights={init!r} needs a float base weight, but {where!r} is "
            f"{'quantized' if quantized else weight.dtype}: use init_lora_weights=True (or "
            "initialise on the float base, then quantize the residual)"
        )
    if values.ranks or values.scales:
        raise ValueError(
            f"init_lora_weights={init!r} on the scanned stack {where!r}, whose layers get "
            "different ranks or scales (rank_pattern / alpha_pattern): the stack's weight is one "
            "leaf; give its layers one rank and alpha, or use unscanned layers")
    if values.rank > max_rank(weight.shape, layout):
        raise ValueError(f"r={values.rank} for {where!r} is larger than min(fan_in, fan_out)="
                         f"{max_rank(weight.shape, layout)} of its weight {weight.shape}: "
                         f"init_lora_weights={init!r} needs r <= that")


def init_factors(w: Any, layout: Layout, r: int, scale: Any, config: Any, key: jax.Array,
                 dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, None]:
    """A and B initialised as peft does (the base unchanged).

    Dense-like (`init=True`): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's kaiming-uniform
    with a = sqrt(5)), B = 0, so the adapted model starts equal to the base. "gaussian": A ~
    N(0, (1/r)^2). Embedding: A = 0, B ~ N(0, 1). `init=False`: both random (A and B uniform as
    PyTorch's Linear default; for an embedding both N(0, 1)).
    """
    init = config.init_lora_weights
    a_shape, b_shape = factor_shapes(w.shape, layout, r)
    _, fan_in, _ = layout.split(w.shape)
    key_a, key_b = jax.random.split(key)

    def uniform(k: jax.Array, shape: tuple[int, ...], fan: int) -> jax.Array:
        bound = 1.0 / math.sqrt(fan)
        return jax.random.uniform(k, shape, dtype, -bound, bound)

    if layout.kind == "embed":
        a = jax.random.normal(key_a, a_shape, dtype) if init is False else jnp.zeros(a_shape, dtype)
        return a, jax.random.normal(key_b, b_shape, dtype), None
    if init == "gaussian":
        a = jax.random.normal(key_a, a_shape, dtype) / r
    else:
        a = uniform(key_a, a_shape, math.prod(fan_in))
    b = uniform(key_b, b_shape, r) if init is False else jnp.zeros(b_shape, dtype)
    return a, b, None


def _randomized_svd(w: jax.Array, r: int, niter: int, key: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rank-r SVD of `w [..., m, n]` by subspace iteration (Halko et al.; what torch's
    `svd_lowrank(w, q=r, niter)` computes, with another random start)."""
    qr = lambda t: jnp.linalg.qr(t)[0]
    wt = jnp.swapaxes(w, -1, -2)
    q = qr(w @ jax.random.normal(key, (*w.shape[:-2], w.shape[-1], r), w.dtype))
    for _ in range(niter):
        q = qr(w @ qr(wt @ q))
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ w, full_matrices=False)
    return q @ u, s, vh


def svd_init(w: jax.Array, layout: Layout, r: int, scale: float, config: Any, key: jax.Array,
             dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA (peft's `init_lora_weights="pissa"` / `"pissa_niter_K"`): A, B from the top-r
    singular triplets of W with the singular values divided by `scale`, and the residual base
    W - scale * A B in W's storage order and dtype; "pissa_niter_K": the randomised SVD."""
    init = config.init_lora_weights
    wc = layout.to_canonical(w).astype(jnp.float32)
    if init == "pissa":
        u, s, vh = jnp.linalg.svd(wc, full_matrices=False)
    else:  # "pissa_niter_K"
        u, s, vh = _randomized_svd(wc, r, int(init.rsplit("_", 1)[1]), key)
    root = jnp.sqrt(s[..., :r] / scale)
    a = u[..., :r] * root[..., None, :]
    b = root[..., :, None] * vh[..., :r, :]
    return _factors_and_residual(w, wc, a, b, layout, scale)


def qr_init(w: jax.Array, layout: Layout, r: int, scale: float, *_: Any
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OLoRA (peft's `init_lora_weights="olora"`): the QR decomposition of W as PyTorch stores
    it (`[out, in]`) gives B from Q's first r columns and A from R's first r rows (no division
    by `scale`); the residual base is W - scale * A B."""
    wc = layout.to_canonical(w).astype(jnp.float32)
    q, rr = jnp.linalg.qr(jnp.swapaxes(wc, -1, -2))
    a = jnp.swapaxes(rr[..., :r, :], -1, -2)
    b = jnp.swapaxes(q[..., :, :r], -1, -2)
    return _factors_and_residual(w, wc, a, b, layout, scale)


def loftq_init(w: jax.Array, layout: Layout, r: int, scale: float, config: Any, *_: Any
               ) -> tuple[jax.Array, jax.Array, Any]:
    """LoftQ (peft's `init_lora_weights="loftq"`, arXiv 2310.08659): alternate quantizing
    W - A B and taking the rank-r SVD of W - dequantized, so that Q + A B approximates W better
    than Q alone. Returns A, B and the quantized base (`config.loftq_config`'s NF4 or int8). As
    in peft the factors are not divided by the scale: exact for lora_alpha = r."""
    quantizer = quantization.nf4 if config.loftq_config.get("loftq_bits", 4) == 4 \
        else quantization.int8
    n_iter = config.loftq_config.get("loftq_iter", 1)
    stack, fan_in, fan_out = layout.split(w.shape)
    wc = layout.to_canonical(w).astype(jnp.float32)
    a = jnp.zeros((*wc.shape[:-1], r), jnp.float32)
    b = jnp.zeros((*wc.shape[:-2], r, wc.shape[-1]), jnp.float32)
    for _step in range(n_iter):
        low = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        target = layout.to_stored((wc - low).reshape(*stack, *fan_in, *fan_out)).astype(w.dtype)
        quantized = quantizer(target)
        residual = wc - layout.to_canonical(jnp.asarray(quantized)).astype(jnp.float32)
        u, s, vh = jnp.linalg.svd(residual, full_matrices=False)
        root = jnp.sqrt(s[..., :r])
        a, b = u[..., :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]
    return (a.reshape(*stack, *fan_in, r), b.reshape(*stack, r, *fan_out), quantized)


def _factors_and_residual(w: jax.Array, wc: jax.Array, a: jax.Array, b: jax.Array,
                          layout: Layout, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    stack, fan_in, fan_out = layout.split(w.shape)
    product = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    residual = layout.to_stored((wc - scale * product).reshape(*stack, *fan_in, *fan_out))
    return (a.reshape(*stack, *fan_in, a.shape[-1]), b.reshape(*stack, b.shape[-2], *fan_out),
            residual.astype(w.dtype))


def pad_ranks(a: jax.Array, b: jax.Array, ranks: tuple[int, ...], layout: Layout,
              init: bool | str) -> tuple[jax.Array, jax.Array]:
    """Factors of rank max(ranks) cut to each stacked layer's rank: zero columns of A and rows
    of B beyond it (exact: they never change the output and get zero gradients), the kept
    ones drawn as peft draws a factor of that layer's rank."""
    rank = a.shape[-1]
    n_out = b.ndim - 1 - layout.leading
    per = jnp.asarray(ranks)
    keep = jnp.arange(rank)[None, :] < per[:, None]  # [L, rank]
    a = a * keep.reshape(len(ranks), *[1] * (a.ndim - 2), rank)
    b = b * keep.reshape(len(ranks), *[1] * (b.ndim - n_out - 2), rank, *[1] * n_out)
    ratio = rank / jnp.maximum(per, 1)  # N(0, 1/r) and U(+-1/sqrt(r)) depend on r
    if layout.kind != "embed" and init == "gaussian":
        a = a * ratio.reshape(-1, *[1] * (a.ndim - 1))
    if layout.kind != "embed" and init is False:
        b = b * jnp.sqrt(ratio).reshape(-1, *[1] * (b.ndim - 1))
    return a, b


for _name in (True, False, "gaussian"):
    register_init(Initialiser(_name, init_factors))
register_init(Initialiser(r"pissa(_niter_[1-9]\d*)?", svd_init, changes_base=True))
register_init(Initialiser("olora", qr_init, changes_base=True))
register_init(Initialiser("loftq", loftq_init, changes_base=True))
