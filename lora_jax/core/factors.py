"""The LoRA math, independent of any module system: factor shapes, initialisation, the delta of a
projection, merging.

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
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

Kind = Literal["dense", "conv", "embed", "einsum"]


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

    def __post_init__(self) -> None:
        if self.order is not None:
            if set(self.order) - set("bio") or "i" not in self.order or "o" not in self.order:
                raise ValueError(
                    f"Layout.order {self.order!r} must use the letters 'b', 'i', 'o' (kept, "
                    "input, output axes) with at least one 'i' and one 'o'"
                )
            object.__setattr__(self, "n_in", self.order.count("i"))

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

    def to_canonical(self, stored: jax.Array) -> jax.Array:
        """The weight as a matrix per stack index: `[*stack, fan_in, fan_out]`."""
        roles = self.roles(stored.ndim)
        order = [i for group in ("sb", "i", "o") for i, r in enumerate(roles) if r in group]
        stack, fan_in, fan_out = self.split(stored.shape)
        return jnp.transpose(stored, order).reshape(*stack, math.prod(fan_in),
                                                     math.prod(fan_out))

    def to_stored(self, canonical: jax.Array) -> jax.Array:
        """An array laid out `[*stack, *in, *out]` transposed to the weight's storage order."""
        roles = self.roles(canonical.ndim)
        canonical_order = [i for group in ("sb", "i", "o")
                           for i, r in enumerate(roles) if r in group]
        return jnp.transpose(canonical, [canonical_order.index(i) for i in range(len(roles))])


def factor_shapes(
    kernel_shape: tuple[int, ...], layout: Layout, r: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A `[*stack, *in, r]` and B `[*stack, r, *out]` for a weight."""
    stack, fan_in, fan_out = layout.split(kernel_shape)
    return (*stack, *fan_in, r), (*stack, r, *fan_out)


def b_rank_axis(layout: Layout) -> int:
    """The rank axis of B `[*stack, r, *out]`: after the stacked and kept axes."""
    return layout.stacked + (layout.order or "").count("b")


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

    return pad(a, a.ndim - 1), pad(b, b_rank_axis(layout))


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


def _letters(layout: Layout, ndim: int) -> tuple[str, str, str, str]:
    """Einsum letters of a weight's axes in storage order, and its stack / in / out letters."""
    roles = layout.roles(ndim)
    letters = string.ascii_lowercase[:ndim]
    pick = lambda group: "".join(c for c, r in zip(letters, roles, strict=True) if r in group)
    return letters, pick("sb"), pick("i"), pick("o")


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array,
                layout: Layout) -> jax.Array:
    """||W + scale * A B|| over the input axes, per output feature: `[*stack, *out]`, float32.

    DoRA's weight norm without forming W + A B or any in x out product: with w_j the weight's
    column j, n_j^2 = ||w_j||^2 + 2 s (A^T w_j) . b_j + s^2 b_j^T (A^T A) b_j.
    """
    w, a, b = (t.astype(jnp.float32) for t in (w, a, b))
    k, stack, fan_in, out = _letters(layout, w.ndim)
    r, q = "R", "S"
    hi = jax.lax.Precision.HIGHEST
    squares = jnp.einsum(f"{k},{k}->{stack}{out}", w, w, precision=hi)
    a_w = jnp.einsum(f"{stack}{fan_in}{r},{k}->{stack}{r}{out}", a, w, precision=hi)
    gram = jnp.einsum(f"{stack}{fan_in}{r},{stack}{fan_in}{q}->{stack}{r}{q}", a, a, precision=hi)
    gram_b = jnp.einsum(f"{stack}{r}{q},{stack}{q}{out}->{stack}{r}{out}", gram, b, precision=hi)
    cross = jnp.sum(a_w * b, axis=len(stack))
    quad = jnp.sum(gram_b * b, axis=len(stack))
    return jnp.sqrt(jnp.maximum(squares + 2 * scale * cross + scale**2 * quad, 0.0))


def dora_output(base: jax.Array, delta: jax.Array, magnitude: jax.Array,
                norm: jax.Array) -> jax.Array:
    """What DoRA adds to a layer's output: (m/n - 1) * base + (m/n) * delta, for the layer's
    product without bias `base`, the low-rank `delta` (scale included), the magnitude `m` and
    the (detached) norm `n` of `column_norm`, both `[*out]` (the output's trailing axes).

    >>> dora_output(jnp.ones(2), jnp.zeros(2), jnp.array([2.0, 1.0]), jnp.ones(2))
    Array([1., 0.], dtype=float32)
    """
    ratio = (magnitude / norm).astype(base.dtype)
    return (ratio - 1) * base + ratio * delta


def per_column(values: jax.Array, layout: Layout, ndim: int) -> jax.Array:
    """`[*stack, *out]` values (e.g. DoRA's m / n) shaped to broadcast against the weight."""
    roles = layout.roles(ndim)
    if "b" in roles:
        raise ValueError("per-output-feature values need a weight without kept axes")
    dims = iter(values.shape)
    return values.reshape([1 if r == "i" else next(dims) for r in roles])


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


def svd_init(w: jax.Array, layout: Layout, r: int, scale: float, niter: int | None = None,
             key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PiSSA (peft's `init_lora_weights="pissa"` / `"pissa_niter_K"`): A, B from the top-r
    singular triplets of W with the singular values divided by `scale`, and the residual base
    W - scale * A B in W's storage order and dtype. `niter` selects the randomised SVD."""
    wc = layout.to_canonical(w).astype(jnp.float32)
    if niter is None:
        u, s, vh = jnp.linalg.svd(wc, full_matrices=False)
    else:
        u, s, vh = _randomized_svd(wc, r, niter, key)
    root = jnp.sqrt(s[..., :r] / scale)
    a = u[..., :r] * root[..., None, :]
    b = root[..., :, None] * vh[..., :r, :]
    return _factors_and_residual(w, wc, a, b, layout, scale)


def qr_init(w: jax.Array, layout: Layout, r: int, scale: float
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OLoRA (peft's `init_lora_weights="olora"`): the QR decomposition of W as PyTorch stores
    it (`[out, in]`) gives B from Q's first r columns and A from R's first r rows (no division
    by `scale`); the residual base is W - scale * A B."""
    wc = layout.to_canonical(w).astype(jnp.float32)
    q, rr = jnp.linalg.qr(jnp.swapaxes(wc, -1, -2))
    a = jnp.swapaxes(rr[..., :r, :], -1, -2)
    b = jnp.swapaxes(q[..., :, :r], -1, -2)
    return _factors_and_residual(w, wc, a, b, layout, scale)


def loftq_init(w: jax.Array, layout: Layout, r: int, quantizer: Callable[[jax.Array], Any],
               n_iter: int) -> tuple[jax.Array, jax.Array, Any]:
    """LoftQ (peft's `init_lora_weights="loftq"`, arXiv 2310.08659): alternate quantizing
    W - A B and taking the rank-r SVD of W - dequantized, so that Q + A B approximates W better
    than Q alone. Returns A, B and the quantized base (`quantizer`'s result, e.g. NF4). As in
    peft the factors are not divided by the scale: exact for lora_alpha = r."""
    stack, fan_in, fan_out = layout.split(w.shape)
    wc = layout.to_canonical(w).astype(jnp.float32)
    a = jnp.zeros((*wc.shape[:-1], r), jnp.float32)
    b = jnp.zeros((*wc.shape[:-2], r, wc.shape[-1]), jnp.float32)
    for _ in range(n_iter):
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


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of `x`; the identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
