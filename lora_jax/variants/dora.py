"""DoRA (peft's `use_dora=True`): LoRA plus a trained magnitude per output feature, which
rescales `W + scale * A B` to that length.

Forward, with `n = stop_gradient(||W + s A B||)` per output feature (formed without any
`in x out` matrix): `y = x W + (m/n - 1) * (x W) + (m/n) * s (x A) B` (bias left out of the
rescaling; with active dropout the base is recomputed on the dropped input, as peft does).
Merge: `W' = (m/n) (W + s A B)`.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core.config import LoraConfig
from lora_jax.core.factors import Layout, broadcast_scale, kernel_delta
from lora_jax.variants import register_variant
from lora_jax.variants.base import Leaf
from lora_jax.variants.lora import Lora


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, layout: Layout) -> jax.Array:
    """||W + A B|| over the input axes, per output feature: `[*stack, *out]`, float32 (the
    scale already in `b`).

    Without forming W + A B or any in x out product: with w_j the weight's column j,
    n_j^2 = ||w_j||^2 + 2 (A^T w_j) . b_j + b_j^T (A^T A) b_j.
    """
    w, a, b = (t.astype(jnp.float32) for t in (w, a, b))
    k = string.ascii_lowercase[:w.ndim]  # einsum letters of the weight's axes, in storage order
    pick = lambda group: "".join(c for c, r in zip(k, layout.roles(w.ndim), strict=True)
                                 if r in group)
    stack, fan_in, out = pick("sb"), pick("i"), pick("o")
    r, q = "R", "S"
    hi = jax.lax.Precision.HIGHEST
    squares = jnp.einsum(f"{k},{k}->{stack}{out}", w, w, precision=hi)
    a_w = jnp.einsum(f"{stack}{fan_in}{r},{k}->{stack}{r}{out}", a, w, precision=hi)
    gram = jnp.einsum(f"{stack}{fan_in}{r},{stack}{fan_in}{q}->{stack}{r}{q}", a, a, precision=hi)
    gram_b = jnp.einsum(f"{stack}{r}{q},{stack}{q}{out}->{stack}{r}{out}", gram, b, precision=hi)
    cross = jnp.sum(a_w * b, axis=len(stack))
    quad = jnp.sum(gram_b * b, axis=len(stack))
    return jnp.sqrt(jnp.maximum(squares + 2 * cross + quad, 0.0))


def per_column(values: jax.Array, layout: Layout, ndim: int) -> jax.Array:
    """`[*stack, *out]` values (e.g. m / n) shaped to broadcast against the weight."""
    dims = iter(values.shape)
    return values.reshape([1 if r == "i" else next(dims) for r in layout.roles(ndim)])


class Dora(Lora):
    """DoRA: LoRA's factors and a magnitude `lora_magnitude_vector [*out]`."""

    name = "dora"
    leaves = (*Lora.leaves, Leaf("lora_magnitude_vector", "o", peft=".lora_magnitude_vector"))
    kinds = ("dense", "conv", "embed")
    _layers = "as in peft, DoRA applies to Dense-like, Conv and Embed layers; exclude it"
    unsupported = {
        "kinds": _layers, "kept_axes": _layers, "materialised": _layers,
        "layer_selection": "the magnitudes of every layer would train; use unscanned layers",
        "adapter_sets": "a magnitude has no mixed-batch form (as in peft)",
        "combinations": "peft leaves a combined DoRA adapter's magnitude at the base weight's "
                        "norm, which is not a combination",
        "conversion": "only plain LoRA factors convert to the original base"}
    recomputes_base = True

    def accepts(self, config: Any) -> bool:
        return isinstance(config, LoraConfig) and config.use_dora

    def init(self, weight: Any, layout: Layout, config: Any, values: Any, key: jax.Array,
             dtype: jnp.dtype, shared: Any = None) -> tuple[dict[str, jax.Array], Any]:
        leaves, residual = super().init(weight, layout, config, values, key, dtype)
        scale = values.scale if values.scale is not None else jnp.asarray(values.scales)
        b = leaves["lora_B"] * broadcast_scale(scale, leaves["lora_B"].ndim)
        norm = column_norm(weight if residual is None else residual, leaves["lora_A"], b, layout)
        return {**leaves, "lora_magnitude_vector": norm.astype(dtype)}, residual

    def forward(self, call: Any, leaves: Mapping[str, jax.Array], scale: Any) -> jax.Array:
        a, b = leaves["lora_A"], leaves["lora_B"]
        b = b * broadcast_scale(scale, b.ndim)
        delta = call.product(a, b)
        norm = jax.lax.stop_gradient(column_norm(call.weight, a, b, call.layout))
        ratio = (leaves["lora_magnitude_vector"] / norm).astype(delta.dtype)
        return (ratio - 1) * call.base() + ratio * delta

    def merge(self, weight: jax.Array, leaves: Mapping[str, jax.Array], scale: Any,
              layout: Layout) -> jax.Array:
        a, b = leaves["lora_A"], leaves["lora_B"]
        b = b * broadcast_scale(scale, b.ndim)
        norm = column_norm(weight, a, b, layout)
        ratio = per_column(leaves["lora_magnitude_vector"] / norm, layout, weight.ndim)
        return (weight + kernel_delta(a, b, layout, weight.shape)) * ratio


register_variant(Dora())
