"""The low-rank math, independent of any module system: weight layouts, factor shapes, the delta
of a projection, merging.

A weight's axes have roles. `stack` axes get separate factors per index: leading axes added by
`nn.scan` / `vmap` (one per stacked layer) and kept axes such as Gemma's q/k/v axis. `in` axes
are contracted with the input (a conv's window and input channels), `out` axes reach the output.
The factors are `A [*stack, *in, r]` and `B [*stack, r, *out]` whatever order the weight stores
its axes in, so A keeps the weight's input axes (and their sharding) and B its output axes. An
embedding table `[*stack, V, D]` reads the same way with `in = (V,)`.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Literal

import jax
import jax.numpy as jnp

Kind = Literal["dense", "conv", "embed", "einsum"]
# The rule name of weights adapted without a layer rule: the adapted weight is materialised.
MATERIALISE = "materialise"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How to read a weight's axes.

    - `kind`: "dense", "conv", "einsum" or "embed" (embeddings initialise the other way round).
    - `stacked`: leading axes added by `nn.scan` / `vmap`, one per stacked layer.
    - `n_in`: the number of input axes when `order` is None: the weight is `[*in, *out]`.
    - `order`: the roles of the weight's own axes (after `stacked`) as stored, one letter each:
      "i" input, "o" output, "b" kept (separate factors per index). E.g. transformers'
      FlaxConv1D stores `[out, in]` ("oi"); Gemma's q/k/v einsum stores SNDH ("boio").
    - `rule`: the name of the layer rule that reads the module (None: read from the tree alone).
    - `weight`: the param name of the weight (None: `kernel`, or `embedding` for "embed").
    - `error`: why the module cannot be adapted (set by `lora_jax.layouts`; `inject` raises it
      if the module is targeted).
    - `assumed`: read from the tree alone (`inject` / `load_peft` without `layouts`): a 2-D
      kernel taken as `[in, out]`, which `wrap` checks against the layer's rule; `merge` and
      `save_peft` cannot, so they refuse a square one unless given `layouts` to confirm it.

    >>> Layout("dense", stacked=1, n_in=1).split((12, 768, 2304))
    ((12,), (768,), (2304,))
    >>> Layout("dense", order="oi").split((2304, 768))
    ((), (768,), (2304,))
    """

    kind: Kind
    stacked: int = 0
    n_in: int = 1
    order: str | None = None
    rule: str | None = None
    weight: str | None = None
    error: str | None = None
    assumed: bool = False

    def __post_init__(self) -> None:
        if self.order is not None:
            if set(self.order) - set("bio") or "i" not in self.order or "o" not in self.order:
                raise ValueError(
                    f"Layout.order {self.order!r} must use the letters 'b', 'i', 'o' (kept, "
                    "input, output axes) with at least one 'i' and one 'o'"
                )
            object.__setattr__(self, "n_in", self.order.count("i"))

    @property
    def leading(self) -> int:
        """How many axes come before a factor's own: the stacked axes, then the batch ("b")."""
        return self.stacked + (self.order or "").count("b")

    def roles(self, ndim: int) -> str:
        """One role letter per axis of a weight with `ndim` axes ("s" for stacked layers)."""
        inner = self.order or "i" * self.n_in + "o" * (ndim - self.stacked - self.n_in)
        if self.stacked + len(inner) != ndim or "o" not in inner:
            raise ValueError(
                f"a {self.kind} weight with {self.stacked} stacked axes and axes "
                f"{inner!r} does not fit {ndim} dimensions"
            )
        return "s" * self.stacked + inner

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(stack, in, out) dimensions of a weight of this layout, each in storage order."""
        roles = self.roles(len(shape))
        pick = lambda letters: tuple(d for d, r in zip(shape, roles, strict=True) if r in letters)
        return pick("sb"), pick("i"), pick("o")

    def _canonical_order(self, ndim: int) -> list[int]:
        """The stored axes in `[*stack, *in, *out]` order."""
        roles = self.roles(ndim)
        return [i for group in ("sb", "i", "o") for i, r in enumerate(roles) if r in group]

    def to_canonical(self, stored: jax.Array) -> jax.Array:
        """The weight as a matrix per stack index: `[*stack, fan_in, fan_out]`."""
        stack, fan_in, fan_out = self.split(stored.shape)
        return jnp.transpose(stored, self._canonical_order(stored.ndim)).reshape(
            *stack, math.prod(fan_in), math.prod(fan_out))

    def to_stored(self, canonical: jax.Array) -> jax.Array:
        """An array laid out `[*stack, *in, *out]` transposed to the weight's storage order."""
        order = self._canonical_order(canonical.ndim)
        return jnp.transpose(canonical, [order.index(i) for i in range(len(order))])


def factor_shapes(
    kernel_shape: tuple[int, ...], layout: Layout, r: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A `[*stack, *in, r]` and B `[*stack, r, *out]` for a weight."""
    stack, fan_in, fan_out = layout.split(kernel_shape)
    return (*stack, *fan_in, r), (*stack, r, *fan_out)


def pad_rank(a: jax.Array, b: jax.Array, layout: Layout, r: int) -> tuple[jax.Array, jax.Array]:
    """A and B zero-padded to rank `r`: the same product, and zero columns of A / rows of B get
    zero gradients, so they stay zero under Adam(W).

    >>> a, b = pad_rank(jnp.ones((3, 2)), jnp.ones((2, 4)), Layout("dense"), 5)
    >>> a.shape, b.shape, float((a @ b).sum())
    ((3, 5), (5, 4), 24.0)
    """
    def pad(x: jax.Array, axis: int) -> jax.Array:
        return jnp.pad(x, [(0, r - x.shape[axis]) if i == axis else (0, 0)
                           for i in range(x.ndim)])

    return pad(a, a.ndim - 1), pad(b, layout.leading)


def max_rank(kernel_shape: tuple[int, ...], layout: Layout) -> int:
    """The largest useful rank: min(fan_in, fan_out)."""
    _, fan_in, fan_out = layout.split(kernel_shape)
    return min(math.prod(fan_in), math.prod(fan_out))


def kernel_delta(a: jax.Array, b: jax.Array, layout: Layout,
                 kernel_shape: tuple[int, ...]) -> jax.Array:
    """A @ B laid out as the weight (its storage order), computed in float32.

    Used to merge and by the materialising fallback; layers with a rule never form it.
    """
    stack, fan_in, fan_out = layout.split(kernel_shape)
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*stack, -1, r)
    b2 = b.astype(jnp.float32).reshape(*stack, r, -1)
    product = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
    return layout.to_stored(product.reshape(*stack, *fan_in, *fan_out))


def project(x: jax.Array, w: jax.Array, axes: tuple[int, ...] = (-1,),
            precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """x @ w, contracting `axes` of x (in sorted order, as flax does) with w's leading axes."""
    axes = tuple(sorted(ax % x.ndim for ax in axes))
    return jnp.tensordot(x, w, axes=(axes, tuple(range(len(axes)))), precision=precision)


def dense_delta(x: jax.Array, a: jax.Array, b: jax.Array, axes: tuple[int, ...] = (-1,),
                precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """(x @ A) @ B for a projection contracting `axes` of x with A's input axes."""
    return jnp.tensordot(project(x, a, axes, precision), b, axes=1, precision=precision)


def embed_delta(ids: jax.Array, a: jax.Array, b: jax.Array,
                precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """A[ids] @ B: the delta of an embedding lookup."""
    return jnp.matmul(jnp.take(a, ids, axis=0), b, precision=precision)


def einsum_roles(equation: str) -> tuple[str, str]:
    """(roles of the kernel's axes, why not adaptable or "") for `"lhs,kernel->out"`.

    A kernel axis is "i" if contracted with the input, "o" if it reaches the output, and "b"
    (separate factors per index) if it is an output axis that leads both the kernel and the
    output, as Gemma's q/k/v axis in `BTD,SNDH->SBTNH`.
    """
    spec = equation.replace(" ", "")
    if spec.count(",") != 1 or "->" not in spec:
        return "", f"equation {equation!r} is not of the form 'input,kernel->output'"
    lhs, rest = spec.split(",")
    kernel, out = rest.split("->")
    if "." in kernel:
        return "", f"kernel spec {kernel!r} of {equation!r} has an ellipsis"
    roles = ""
    for c in kernel:
        if c in lhs and c in out:
            return "", (f"kernel axis {c!r} of {equation!r} is shared by input, kernel and "
                        "output (a batch axis)")
        roles += "i" if c in lhs else "o" if c in out else "?"
    if "?" in roles or "i" not in roles or "o" not in roles:
        return "", (f"{equation!r}: LoRA needs kernel axes that are each contracted with the "
                    "input or reach the output, with at least one of each")
    first_input = min((out.index(c) for c in lhs if c in out), default=len(out))
    leading = 0
    while leading < len(kernel) and roles[leading] == "o" and out.find(kernel[leading]) < \
            first_input and out.find(kernel[leading]) == leading:
        leading += 1
    if leading and "o" in roles[leading:]:
        roles = "b" * leading + roles[leading:]
    return roles, ""


def einsum_delta(equation: str, x: jax.Array, a: jax.Array, b: jax.Array,
                 precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """(x @ A) @ B for `jnp.einsum(equation, x, kernel)`, with the roles of `einsum_roles`."""
    roles, why = einsum_roles(equation)
    if why:
        raise ValueError(why)
    lhs, rest = equation.replace(" ", "").split(",")
    kernel, out = rest.split("->")
    pick = lambda role: "".join(c for c, r in zip(kernel, roles, strict=True) if r == role)
    kept, contracted, produced = pick("b"), pick("i"), pick("o")
    rank = next(c for c in string.ascii_letters if c not in lhs + kernel + out)
    lhs_rest = "".join(c for c in lhs if c not in contracted)
    low = jnp.einsum(f"{lhs},{kept}{contracted}{rank}->{kept}{lhs_rest}{rank}", x, a,
                     precision=precision)
    return jnp.einsum(f"{kept}{lhs_rest}{rank},{kept}{rank}{produced}->{out}", low, b,
                      precision=precision)


def broadcast_scale(scale: Any, ndim: int) -> Any:
    """A float, or an array scale over leading axes, shaped to multiply an `ndim` array."""
    if isinstance(scale, int | float):
        return scale
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x`; the identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
