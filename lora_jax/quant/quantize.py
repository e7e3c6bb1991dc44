"""Quantized frozen weights for QLoRA (docs/guides/qlora.md): NF4 as bitsandbytes defines it,
and int8. A quantized weight is a pytree of integer codes and scales that stands in for the float
kernel and is dequantized where the layer uses it (`jnp.asarray(w)`, which flax's layers call),
inside the jitted forward; in a scanned + remat stack one layer's float kernel exists at a time.

- NF4 (QLoRA, arXiv 2305.14314; bitsandbytes `quantize_4bit(quant_type="nf4")`): blocks of 64
  consecutive values of each trailing matrix in row-major order (as bitsandbytes flattens), each
  scaled by its absmax and rounded to the nearest of the 16 normal-float levels, as a `uint4`
  array of the weight's shape (bitsandbytes' bytes hold the same codes, the first in the high
  nibble). Double quantisation: the absmax values of each matrix minus their mean, in blocks of
  256, as 8-bit codes of bitsandbytes' dynamic map with one float scale per block. The block codes
  are stored `[*stack, rows, cols / 64]` (flat `[*stack, blocks]` when 64 does not divide cols),
  so they shard like the kernel (`specs`).
- int8: one absmax scale per column of each trailing matrix (per output feature and stacked
  layer), codes round(127 w / absmax).

>>> import jax, jax.numpy as jnp
>>> w = jax.random.normal(jax.random.key(0), (128, 64))
>>> q = nf4(w)
>>> q.shape, q.codes.dtype
((128, 64), dtype(uint4))
>>> bool(jnp.abs(jnp.asarray(q) - w).max() < 0.15 * jnp.abs(w).max())  # NF4's worst case
True
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from lora_jax.core.targets import iter_modules, matches, with_leaves

# The 16 NF4 levels (bitsandbytes functional.py; QLoRA's normal-float code book).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
BLOCK = 64
DQ_BLOCK = 256
# The name dequantized weights carry (jax.ad_checkpoint.checkpoint_name), for remat policies
# such as `jax.checkpoint_policies.save_anything_except_these_names(DEQUANTIZED)`.
DEQUANTIZED = "lora_jax_dequantized"


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers, 8-bit approximations, 2015): for each
    decade 10^-6 ... 10^0, the midpoints of 2^i even steps over [0.1, 1], both signs, plus 0 and
    1; sorted."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2**i + 1)
        means = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += [*means, *(-means)]
    return np.sort(np.asarray(values, np.float32))


_DYNAMIC = dynamic_code()


def _nearest(values: jax.Array, levels: np.ndarray) -> jax.Array:
    """The index of the nearest level (sorted levels; the lower one on an exact tie): how many
    midpoints lie below each value. (Counted by one fused comparison; `jnp.searchsorted`
    gives the same indices but keeps six times the input in temporaries.)"""
    midpoints = jnp.asarray((levels[1:] + levels[:-1]) / 2)
    return jnp.sum(values[..., None] > midpoints, axis=-1, dtype=jnp.uint8)


class _Quantized(abc.ABC):
    """Shared behaviour of quantized weights: a pytree of `FIELDS` arrays (keyed by field name,
    so paths read `...kernel.codes`) with the original float dtype and the `STATIC` attributes
    as static data, read as a float array through `dequantize`."""

    FIELDS: tuple[str, ...] = ()
    STATIC: tuple[str, ...] = ()
    codes: jax.Array  # every kind's first field, of the weight's shape
    dtype: Any

    def __init__(self, *children: Any, dtype: Any, **static: Any) -> None:
        for name, child in zip(self.FIELDS, children, strict=True):
            setattr(self, name, child)
        self.dtype = jnp.dtype(dtype)
        for name in self.STATIC:
            setattr(self, name, static[name])

    def _aux(self) -> tuple[Any, ...]:
        return (self.dtype.name, *(getattr(self, name) for name in self.STATIC))

    def tree_flatten(self) -> tuple[tuple[Any, ...], Any]:
        return tuple(getattr(self, name) for name in self.FIELDS), self._aux()

    def tree_flatten_with_keys(self) -> tuple[tuple[Any, ...], Any]:
        return tuple((jax.tree_util.DictKey(name), getattr(self, name))
                     for name in self.FIELDS), self._aux()

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Any:
        dtype, *static = aux
        return cls(*children, dtype=dtype, **dict(zip(cls.STATIC, static, strict=True)))

    def with_fields(self, *children: Any) -> Any:
        """The same kind of weight (dtype and static attributes) with other fields."""
        return self.tree_unflatten(self._aux(), children)

    @property
    def shape(self) -> tuple[int, ...]:
        # The first leaf (the codes) has the weight's shape: flax checks an existing param by it.
        return tuple(getattr(self, self.FIELDS[0]).shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float weight (in `dtype`, default the original one)."""
        weight = self._float().astype(dtype or self.dtype)
        return checkpoint_name(weight, DEQUANTIZED)

    @abc.abstractmethod
    def _float(self) -> jax.Array:
        """The weight in float32: each format's dequantization."""

    def __jax_array__(self) -> jax.Array:
        return self.dequantize()

    def specs(self, spec: P) -> Any:
        """`PartitionSpec`s of the fields, as a tree like `self`, for a kernel partitioned by
        `spec` (`lora_jax.sharding` calls this): the codes take the kernel's spec and the scales
        the spec of the axes they follow, so a block never straddles a shard (a sharded axis
        whose blocks do not divide over its devices is refused by `named_shardings`)."""
        full = (*spec, *(None,) * (self.ndim - len(spec)))
        return self.with_fields(*self._specs(full[:-2], *full[-2:]))

    @abc.abstractmethod
    def _specs(self, stack: tuple[Any, ...], rows: Any, cols: Any) -> tuple[P | None, ...]:
        """The fields' specs for a kernel spec `(*stack, rows, cols)` (None: an absent field)."""

    def astype(self, dtype: Any) -> jax.Array:
        return self.dequantize(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype.name})"


@jax.tree_util.register_pytree_with_keys_class
class NF4Tensor(_Quantized):
    """An NF4-quantized weight (see the module docstring); `jnp.asarray` dequantizes it."""

    FIELDS = ("codes", "absmax", "absmax_scale", "offset")
    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array
    offset: jax.Array

    def _float(self) -> jax.Array:
        *batch, rows, cols = self.codes.shape
        values = jnp.asarray(NF4_LEVELS)[self.codes.astype(jnp.int32)]
        n_blocks = rows * cols // BLOCK
        scales = jnp.asarray(_DYNAMIC)[self.absmax.reshape(*batch, n_blocks)]
        scales = jnp.pad(scales, [(0, 0)] * len(batch) + [(0, -n_blocks % DQ_BLOCK)]).reshape(
            *batch, -1, DQ_BLOCK)
        absmax = (scales * self.absmax_scale[..., None]).reshape(*batch, -1)[..., :n_blocks]
        absmax = absmax + self.offset[..., None]
        return (values.reshape(*batch, n_blocks, BLOCK) * absmax[..., None]).reshape(self.shape)

    def _specs(self, stack: tuple[Any, ...], rows: Any, cols: Any) -> tuple[P, ...]:
        if self.absmax.ndim == self.ndim:  # [*stack, rows, cols / 64]
            absmax = P(*stack, rows, cols)
        elif cols is None:  # flat blocks in row-major order: contiguous per row shard
            absmax = P(*stack, rows)
        else:
            raise ValueError(
                f"an NF4 kernel of shape {self.shape} has {self.shape[-1]} columns, not a "
                f"multiple of {BLOCK}: its blocks span rows, so its output axis cannot be "
                f"sharded (spec {P(*stack, rows, cols)}); leave that axis unsharded"
            )
        # The double quantisation's constants (one per 256 blocks, one offset per matrix) are
        # tiny: each shard keeps all of its matrix's.
        return P(*stack, rows, cols), absmax, P(*stack, None), P(*stack)


@jax.tree_util.register_pytree_with_keys_class
class Int8Tensor(_Quantized):
    """An int8 weight with one absmax scale per column of each trailing matrix."""

    FIELDS = ("codes", "scale")
    codes: jax.Array
    scale: jax.Array

    def _float(self) -> jax.Array:
        return self.codes.astype(jnp.float32) * self.scale

    def _specs(self, stack: tuple[Any, ...], rows: Any, cols: Any) -> tuple[P, ...]:
        return P(*stack, rows, cols), P(*stack, None, cols)


def is_quantized(x: Any) -> TypeGuard[_Quantized]:
    """Whether `x` is a quantized weight (NF4, int8, or a GGUF file's blocks).

    >>> import jax.numpy as jnp
    >>> is_quantized(int8(jnp.ones((4, 3)))), is_quantized(jnp.ones((4, 3)))
    (True, False)
    """
    return isinstance(x, _Quantized)


def has_quantized(params: Any) -> bool:
    """Whether any weight in the tree is quantized.

    >>> import jax.numpy as jnp
    >>> has_quantized({"q": {"kernel": int8(jnp.ones((4, 3))), "bias": jnp.zeros(3)}})
    True
    """
    return any(map(is_quantized, jax.tree.leaves(params, is_leaf=is_quantized)))


def nf4(w: jax.Array) -> NF4Tensor:
    """NF4 with double quantisation; each trailing matrix `w[..., :, :]` (one per stacked layer)
    is flattened into blocks of 64 (which must divide its size) and has its own
    double-quantisation constants, the same as if it were quantized alone (so quantizing layers
    then stacking them equals quantizing the stack, bit for bit).

    >>> import jax, jax.numpy as jnp
    >>> w = jax.random.normal(jax.random.key(0), (2, 64, 8))   # two stacked layers
    >>> bool((nf4(w).codes[1] == nf4(w[1]).codes).all())
    True
    """
    if w.ndim < 2 or (w.shape[-1] * w.shape[-2]) % BLOCK:
        raise ValueError(f"NF4 needs a weight of at least 2 axes whose trailing matrix size is a "
                         f"multiple of {BLOCK}, got shape {tuple(w.shape)}")
    if w.ndim == 2:
        return _nf4_matrix(w)
    # One compiled matrix program for each: a batched or differently fused mean would sum in
    # another order (1-ulp differences in the offsets that flip a few absmax codes).
    *batch, rows, cols = w.shape
    matrices = [_nf4_matrix(m) for m in w.reshape(-1, rows, cols)]
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*batch, *xs[0].shape), *matrices)


@jax.jit
def _nf4_matrix(w: jax.Array) -> NF4Tensor:
    rows, cols = w.shape
    blocks = w.astype(jnp.float32).reshape(rows * cols // BLOCK, BLOCK)
    absmax = jnp.abs(blocks).max(-1)
    normal = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    # The first leaf has the weight's shape: flax checks an existing param's shape by it.
    codes = _nearest(normal, NF4_LEVELS).reshape(rows, cols).astype(jnp.uint4)
    # Double quantisation of the absmax values: minus their mean, 8-bit dynamic codes in blocks
    # of 256, each block scaled by its own absmax.
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.shape[0]
    padded = jnp.pad(centred, (0, -n % DQ_BLOCK)).reshape(-1, DQ_BLOCK)
    scale = jnp.abs(padded).max(-1)
    absmax_codes = _nearest(padded / jnp.where(scale == 0, 1.0, scale)[..., None], _DYNAMIC)
    absmax_codes = absmax_codes.reshape(-1)[:n]
    if cols % BLOCK == 0:  # the kernel's axes, so that the block codes shard like it
        absmax_codes = absmax_codes.reshape(rows, cols // BLOCK)
    return NF4Tensor(codes, absmax_codes, scale, offset, dtype=w.dtype)


def int8(w: jax.Array) -> Int8Tensor:
    """int8 codes with one absmax scale per column of each trailing matrix `w[..., :, :]` (per
    output feature, and per layer of a stacked kernel).

    >>> import jax.numpy as jnp
    >>> q = int8(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
    >>> q.codes.tolist(), [round(float(v), 3) for v in jnp.asarray(q).ravel()]  # absmax -> 127
    ([[127, -64], [64, 127]], [1.0, -2.016, 0.504, 4.0])
    """
    w32 = w.astype(jnp.float32)
    absmax = jnp.abs(w32).max(axis=-2, keepdims=True)
    scale = jnp.where(absmax == 0, 1.0, absmax) / 127.0
    return Int8Tensor(jnp.round(w32 / scale).astype(jnp.int8), scale, dtype=w.dtype)


KINDS = {"nf4": nf4, "int8": int8}
_SKIPPED = ("lm_head", "classifier", "score")


def _chooser(kind: str, exclude: Sequence[str], modules_to_save: Sequence[str] | None
             ) -> Callable[[str, Any], bool]:
    """Whether `quantize` quantizes the kernel of a module: float, 2 axes or more, not already
    quantized, not in a head, `exclude` or `modules_to_save`. Checks `kind`."""
    if kind not in KINDS:
        raise ValueError(f"quantize: kind must be one of {sorted(KINDS)}, got {kind!r}")
    skipped = (*_SKIPPED, *exclude, *(modules_to_save or ()))
    return lambda module, kernel: (
        kernel is not None and not is_quantized(kernel) and getattr(kernel, "ndim", 0) >= 2
        and jnp.issubdtype(kernel.dtype, jnp.floating) and not matches(skipped, module))


def _misfits(kind: str, kernel: Any) -> bool:
    return kind == "nf4" and (kernel.shape[-1] * kernel.shape[-2]) % BLOCK != 0


def _misfit_error(refused: Sequence[str]) -> ValueError:
    return ValueError(
        f"quantize: NF4 blocks of {BLOCK} must divide each kernel's trailing matrix; these do "
        f"not: {list(refused)[:10]}. Leave them in float with exclude=[...], or use kind='int8'")


def leaf_quantizer(kind: str = "nf4", *, exclude: Sequence[str] = (),
                   modules_to_save: Sequence[str] | None = None) -> Callable[[str, Any], Any]:
    """`quantize`'s choice for one leaf, for loaders that quantize as they read
    (`from_pretrained(..., quantize="nf4")`): `(path, value)` -> the value quantized if `path`
    (dotted, e.g. `model.layers_0.mlp.up_proj.kernel`) is a kernel `quantize` would quantize,
    else the value as it is. A kernel NF4's blocks do not fit raises a ValueError.

    >>> import jax.numpy as jnp
    >>> convert = leaf_quantizer("int8")
    >>> [type(convert(p, jnp.ones((4, 3)))).__name__ for p in ("h.q.kernel", "lm_head.kernel")]
    ['Int8Tensor', 'ArrayImpl']
    """
    chosen = _chooser(kind, exclude, modules_to_save)

    def convert(path: str, value: Any) -> Any:
        module, _, name = path.rpartition(".")
        if name != "kernel" or not chosen(module, value):
            return value
        if _misfits(kind, value):
            raise _misfit_error([f"{module} {tuple(value.shape)}"])
        return KINDS[kind](value)

    return convert


def quantize(params: Mapping[str, Any], kind: str = "nf4", *,
             exclude: Sequence[str] = (), modules_to_save: Sequence[str] | None = None
             ) -> dict[str, Any]:
    """The params tree with every Dense-like `kernel` (2 axes or more) quantized (`kind`: "nf4"
    or "int8"), except output / classification heads (`lm_head`, `classifier`, `score`), the
    modules in `exclude` and in `modules_to_save` (they train), matched as `target_modules`
    lists are. Embeddings, norms and biases stay float; kernels already quantized (by LoftQ, or
    a GGUF file's blocks) are kept. Quantizing leaf by leaf keeps the peak host memory at one
    float kernel beyond the result; loaders quantize as they read (`leaf_quantizer`).

        params = lora_jax.quantize(params, "nf4")     # then inject / wrap as usual

    >>> import jax, jax.numpy as jnp
    >>> params = {"up": {"kernel": jnp.ones((64, 8))}, "lm_head": {"kernel": jnp.ones((8, 64))}}
    >>> q = quantize(params, "nf4")
    >>> type(q["up"]["kernel"]).__name__, type(q["lm_head"]["kernel"]).__name__  # heads stay float
    ('NF4Tensor', 'ArrayImpl')
    """
    chosen = _chooser(kind, exclude, modules_to_save)
    updates: dict[str, dict[str, Any]] = {}
    refused, already = [], []
    for path, module in iter_modules(params, leaves=None):
        kernel: Any = module.get("kernel")
        if is_quantized(kernel):
            already.append(path)
        elif chosen(path, kernel):
            if _misfits(kind, kernel):
                refused.append(f"{path} {tuple(kernel.shape)}")
            else:
                updates[path] = {"kernel": KINDS[kind](kernel)}
    if refused:
        raise _misfit_error(refused)
    if not updates and already:
        raise ValueError(f"quantize: {already[0]!r} is already quantized, and so is every other "
                         "kernel: quantize the float params once")
    if not updates:
        raise ValueError("quantize: no Dense-like kernel to quantize in the params tree")
    return with_leaves(params, updates)


def quantized_product(product: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                      weight: _Quantized) -> jax.Array:
    """`product(x, weight.dequantize())` for a `product` linear in `x` (a layer's matmul or
    convolution), whose backward dequantizes the weight again instead of keeping the float
    weight from the forward as a residual: a training step holds the codes, and one float
    weight at a time. Each dequantization reads one element of the value it serves (`x`, or
    the incoming gradient), so XLA neither computes it before that value exists nor merges the
    backward's with the forward's (CSE); no gradient flows to the frozen weight.

    >>> import jax, jax.numpy as jnp
    >>> w = nf4(jax.random.normal(jax.random.key(0), (64, 8)))
    >>> x = jnp.ones((2, 64))
    >>> grad = jax.grad(lambda x: quantized_product(jnp.matmul, x, w).sum())(x)
    >>> bool(jnp.allclose(grad, jnp.ones((2, 8)) @ w.dequantize().T, rtol=1e-6))
    True
    """
    return _product(product, jax.ShapeDtypeStruct(x.shape, x.dtype), x, weight)


def _after(weight: _Quantized, value: jax.Array) -> _Quantized:
    """`weight` whose codes depend on `value`, exactly: clipped to the top of their range, which
    is one higher when value's first element is NaN (codes never exceed that range). (An
    `optimization_barrier` does not do it: XLA's CPU pipeline drops barriers before its last
    CSE. On a mesh, the element read is one scalar transfer per call.)"""
    codes, *rest = jax.tree.leaves(weight)
    if value.size:
        nan = jnp.isnan(value.reshape(-1)[0]).astype(jnp.int32)
        codes = jnp.minimum(codes.astype(jnp.int32), jnp.iinfo(codes.dtype).max + nan) \
            .astype(codes.dtype)
    return jax.tree.unflatten(jax.tree.structure(weight), [codes, *rest])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _product(product: Callable[[jax.Array, jax.Array], jax.Array], x_shape: Any, x: jax.Array,
             weight: _Quantized) -> jax.Array:
    return product(x, _after(weight, x).dequantize())


def _product_fwd(product: Callable[[jax.Array, jax.Array], jax.Array], x_shape: Any,
                 x: jax.Array, weight: _Quantized) -> tuple[jax.Array, Any]:
    return _product(product, x_shape, x, weight), weight


def _product_bwd(product: Callable[[jax.Array, jax.Array], jax.Array], x_shape: Any,
                 weight: _Quantized, grad: jax.Array) -> tuple[jax.Array, None]:
    w = _after(weight, grad).dequantize()
    (dx,) = jax.linear_transpose(lambda x: product(x, w), x_shape)(grad)
    return dx, None


_product.defvjp(_product_fwd, _product_bwd)


def dequantize(params: Mapping[str, Any]) -> Any:
    """The params tree with every quantized weight replaced by its float value.

    >>> import jax, jax.numpy as jnp
    >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (64, 8))}}
    >>> back = dequantize(quantize(params, "int8"))
    >>> back["up"]["kernel"].dtype, bool(jnp.allclose(back["up"]["kernel"], params["up"]["kernel"],
    ...                                               atol=0.03))
    (dtype('float32'), True)
    """
    return jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, params,
                        is_leaf=is_quantized)
