"""The LoRA math, independent of any module system: factor shapes, initialisation, merging.

A kernel is read as `[*stack, *in, *out]`: `stack` are leading axes added by `nn.scan`/`vmap`
(one per stacked layer), `in` the contracting axes (a conv's window and input channels), `out`
the output axes. Its factors are `A [*stack, *in, r]` and `B [*stack, r, *out]`, so A keeps the
kernel's input axes (and their sharding) and B its output axes. An embedding table
`[*stack, V, D]` reads the same way with `in = (V,)`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

Kind = Literal["dense", "conv", "embed", "einsum"]

# Leaf names of the factors beside a kernel / an embedding table (peft's names).
KERNEL_FACTORS = ("lora_A", "lora_B")
EMBED_FACTORS = ("lora_embedding_A", "lora_embedding_B")
FACTOR_LEAVES = KERNEL_FACTORS + EMBED_FACTORS


@dataclasses.dataclass(frozen=True)
class Layout:
    """How to read a kernel's axes: its layer kind, stacked leading axes and input axes.

    >>> Layout("dense", stacked=1, n_in=1).split((12, 768, 2304))
    ((12,), (768,), (2304,))
    """

    kind: Kind
    stacked: int = 0
    n_in: int = 1

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(stack, in, out) dimensions of a kernel of this layout."""
        s, n = self.stacked, self.n_in
        if len(shape) < s + n + 1:
            raise ValueError(
                f"a {self.kind} kernel with {s} stacked and {n} input axes needs at least "
                f"{s + n + 1} dimensions, got shape {shape}"
            )
        return shape[:s], shape[s : s + n], shape[s + n :]


def factor_shapes(
    kernel_shape: tuple[int, ...], layout: Layout, r: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A `[*stack, *in, r]` and B `[*stack, r, *out]` for a kernel."""
    stack, fan_in, fan_out = layout.split(kernel_shape)
    return (*stack, *fan_in, r), (*stack, r, *fan_out)


def max_rank(kernel_shape: tuple[int, ...], layout: Layout) -> int:
    """The largest useful rank: min(fan_in, fan_out)."""
    _, fan_in, fan_out = layout.split(kernel_shape)
    return min(math.prod(fan_in), math.prod(fan_out))


def init_factors(
    key: jax.Array,
    kernel_shape: tuple[int, ...],
    layout: Layout,
    r: int,
    init: bool | str = True,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """A and B initialised as peft does.

    Dense-like (`init=True`): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's kaiming-uniform
    with a = sqrt(5)), B = 0, so the adapted model starts equal to the base. "gaussian": A ~
    N(0, (1/r)^2). Embedding: A = 0, B ~ N(0, 1). `init=False`: both random (A and B uniform as
    PyTorch's Linear default; for an embedding both N(0, 1)).
    """
    a_shape, b_shape = factor_shapes(kernel_shape, layout, r)
    _, fan_in, _ = layout.split(kernel_shape)
    key_a, key_b = jax.random.split(key)

    def uniform(k: jax.Array, shape: tuple[int, ...], fan: int) -> jax.Array:
        bound = 1.0 / math.sqrt(fan)
        return jax.random.uniform(k, shape, dtype, -bound, bound)

    if layout.kind == "embed":
        a = jax.random.normal(key_a, a_shape, dtype) if init is False else jnp.zeros(a_shape, dtype)
        return a, jax.random.normal(key_b, b_shape, dtype)
    if init == "gaussian":
        a = jax.random.normal(key_a, a_shape, dtype) / r
    else:
        a = uniform(key_a, a_shape, math.prod(fan_in))
    b = uniform(key_b, b_shape, r) if init is False else jnp.zeros(b_shape, dtype)
    return a, b


def kernel_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> jax.Array:
    """A @ B laid out as the kernel `[*stack, *in, *out]`, computed in float32.

    The number of stacked axes follows from the shapes: A and B each carry them, the kernel once.
    Used only to merge; the forward pass never forms this product.
    """
    stacked = a.ndim + b.ndim - 2 - len(kernel_shape)
    stack = a.shape[:stacked]
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*stack, -1, r)
    b2 = b.astype(jnp.float32).reshape(*stack, r, -1)
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel_shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x`; the identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
