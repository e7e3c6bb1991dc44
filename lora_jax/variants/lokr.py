"""LoKr (peft's `LoKrConfig`, from LyCORIS; docs/guides/variants.md), as peft 0.21 does it: the
update of a weight is a Kronecker product, `delta W = alpha / r * kron(w1, w2)` on PyTorch's
`[out, in]` weight.

The sizes split as `out = a * b`, `in = c * d` (`factorization`); `w1 [a, c]` and `w2 [b, d]` are
full, or low-rank products, as peft chooses (`leaf_shapes`). The leaves hold them transposed (a
weight's input side first, as LoRA's A `[in, r]`), so peft's files hold them with the axes
reversed. The scale is `alpha / r`, also when both factors are full (no rank anywhere). While
training, `module_dropout` drops the whole term (one draw per call, not rescaled) and
`rank_dropout` output features (`dropout_masks`). peft adapts torch Linear (and Conv) layers only:
GPT-2's `Conv1D` and embeddings are refused. The forward never forms the `in x out` matrix: for
`x [..., c * d]`, `y[..., a, b] = scale * sum_cd w1[a, c] w2[b, d] x[..., c, d]`, two small
contractions.

>>> w1, w2 = jnp.arange(6.0).reshape(2, 3), jnp.arange(8.0).reshape(2, 4)
>>> x = jnp.ones((5, 12))
>>> bool(jnp.allclose(kron_apply(x, w1, w2), x @ jnp.kron(w1, w2).T))
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lora_jax.core.config import AdapterConfig, is_number
from lora_jax.core.factors import Layout
from lora_jax.variants import register_variant
from lora_jax.variants.base import Leaf, Variant

W1, W1_A, W1_B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2_A, W2_B = "lokr_w2", "lokr_w2_a", "lokr_w2_b"


@dataclasses.dataclass(frozen=True)
class LoKrConfig(AdapterConfig):
    """What to adapt with LoKr and how; peft's `LoKrConfig` field names and defaults.

    `r`, `alpha` (scale `alpha / r`), `decompose_both`, `decompose_factor` and `init_weights`
    (True, False or "lycoris") shape and start the factors (see the module docstring);
    `rank_dropout`, `rank_dropout_scale` and `module_dropout` act while training.
    `use_effective_conv2d` only concerns convolutions, which lora_jax's LoKr does not adapt.
    The target fields (`target_modules`, `exclude_modules`, `layers_to_transform`,
    `layers_pattern`, `rank_pattern`, `alpha_pattern`, `modules_to_save`, `task_type`) match
    as in `lora_jax.LoraConfig`.

    >>> config = LoKrConfig(r=4, alpha=8, target_modules=["q_proj"])
    >>> config.scaling("model.layers.0.self_attn.q_proj")
    2.0
    """

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    init_weights: bool | Literal["lycoris"] = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._freeze()
        self._validate()

    def _validate(self) -> None:
        self._check_numbers("alpha", flags=("use_effective_conv2d", "decompose_both",
                                            "rank_dropout_scale"),
                            rates=("rank_dropout", "module_dropout"))
        self._require(is_number(self.decompose_factor, int), "decompose_factor",
                      "an integer (-1: near the square root)")
        self._require(self.init_weights in (True, False, "lycoris"), "init_weights",
                      "True, False or 'lycoris'")
        self._check_layer_selection("peft ignores it there")

    @property
    def default_alpha(self) -> float:
        """The alpha of modules no `alpha_pattern` names (peft's LoKr field `alpha`)."""
        return self.alpha

    __hash__ = AdapterConfig.__hash__


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (LyCORIS's) split of `dimension` into `m * n`: `(factor, dimension // factor)` if
    `factor > 0` divides it, else the divisor pair `m <= n` with the largest `m` up to
    `factor` (any, for -1) reached by stepping up from 1 while `m + n` does not grow.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def leaf_shapes(fan_in: int, fan_out: int, r: int, decompose_factor: int = -1,
                decompose_both: bool = False) -> dict[str, tuple[int, int]]:
    """{leaf name: shape} of the factors of an `[in, out]` weight, as peft chooses them (each
    the transpose of peft's: `lokr_w1 [c, a]`, `lokr_w1_a [r, a]`, `lokr_w1_b [c, r]`, ...).

    >>> leaf_shapes(32, 64, 8)
    {'lokr_w1': (4, 8), 'lokr_w2': (8, 8)}
    >>> leaf_shapes(32, 64, 2, decompose_both=True)
    {'lokr_w1_a': (2, 8), 'lokr_w1_b': (4, 2), 'lokr_w2_a': (2, 8), 'lokr_w2_b': (8, 2)}
    """
    a, b = factorization(fan_out, decompose_factor)
    c, d = factorization(fan_in, decompose_factor)
    shapes: dict[str, tuple[int, int]] = {}
    if decompose_both and r < max(a, c) / 2:
        shapes.update({W1_A: (r, a), W1_B: (c, r)})
    else:
        shapes[W1] = (c, a)
    if r < max(b, d) / 2:
        shapes.update({W2_A: (r, b), W2_B: (d, r)})
    else:
        shapes[W2] = (d, b)
    return shapes


def init_leaves(key: jax.Array, shapes: Mapping[str, tuple[int, ...]],
                init_weights: bool | str = True, dtype: Any = jnp.float32
                ) -> dict[str, jax.Array]:
    """The factors started as peft starts them (shapes may lead with stacked axes): one of
    them zero (`w1` or `w1_a` for True, `w2` or `w2_b` for "lycoris", none for False), the
    others U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in being peft's second axis (the leaf's
    second-last): PyTorch's kaiming-uniform with a = sqrt(5).

    >>> leaves = init_leaves(jax.random.key(0), {"lokr_w1": (2, 3), "lokr_w2": (4, 4)})
    >>> float(jnp.abs(leaves["lokr_w1"]).max()), bool(jnp.abs(leaves["lokr_w2"]).max() <= 0.5)
    (0.0, True)
    """
    zero = {True: (W1, W1_A), "lycoris": (W2, W2_B), False: ()}[init_weights]
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True):
        bound = 1.0 / math.sqrt(shape[-2])
        out[name] = jnp.zeros(shape, dtype) if name in zero else \
            jax.random.uniform(k, shape, dtype, -bound, bound)
    return out


def kron_factors(leaves: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(w1 `[*stack, a, c]`, w2 `[*stack, b, d]`) in peft's order, multiplied out where they
    are low-rank."""
    t = lambda w: jnp.swapaxes(w, -1, -2)
    w1 = t(leaves[W1]) if W1 in leaves else t(leaves[W1_B] @ leaves[W1_A])
    w2 = t(leaves[W2]) if W2 in leaves else t(leaves[W2_B] @ leaves[W2_A])
    return w1, w2


def kron_apply(x: jax.Array, w1: jax.Array, w2: jax.Array,
               precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """`x @ kron(w1, w2).T` for `x [..., c * d]`, `w1 [a, c]`, `w2 [b, d]`: `[..., a * b]`,
    without forming the Kronecker product (the cheaper of the two contraction orders)."""
    (a, c), (b, d) = w1.shape, w2.shape
    lead = x.shape[:-1]
    x = x.reshape(*lead, c, d)
    if c * b * (d + a) <= a * d * (c + b):  # over d first, then c
        t = jnp.einsum("...cd,bd->...cb", x, w2, precision=precision)
        y = jnp.einsum("ac,...cb->...ab", w1, t, precision=precision)
    else:  # over c first, then d
        t = jnp.einsum("ac,...cd->...ad", w1, x, precision=precision)
        y = jnp.einsum("...ad,bd->...ab", t, w2, precision=precision)
    return y.reshape(*lead, a * b)


def dropout_masks(key: jax.Array, features: int, rank_dropout: float,
                  rank_dropout_scale: bool, module_dropout: float) -> jax.Array:
    """The training-time multiplier of the term `[features]`: zero when the module is dropped
    (`uniform() <= module_dropout`), else peft's rank-dropout mask `uniform(features) >
    rank_dropout`, divided by its mean with `rank_dropout_scale` (zero, not peft's NaN, when
    every feature is dropped)."""
    module_key, rank_key = jax.random.split(key)
    keep_module = jax.random.uniform(module_key, ()) > module_dropout
    mask = (jax.random.uniform(rank_key, (features,)) > rank_dropout).astype(jnp.float32)
    if rank_dropout_scale:
        mask = mask / jnp.maximum(mask.mean(), 1.0 / features)
    return jnp.where(keep_module, mask, 0.0)


def lokr_term(x: jax.Array, leaves: Mapping[str, jax.Array], scale: Any,
              mask: jax.Array | None = None, precision: jax.lax.PrecisionLike = None
              ) -> jax.Array:
    """What LoKr adds to a layer's output for `x [..., in]`: `scale * x @ kron(w1, w2).T`
    `[..., out]` (times a `dropout_masks` multiplier while training), in `x`'s dtype."""
    w1, w2 = kron_factors(leaves)
    y = kron_apply(x, (w1 * scale).astype(x.dtype), w2.astype(x.dtype), precision)
    return y if mask is None else y * mask.astype(y.dtype)


def merge_delta(leaves: Mapping[str, jax.Array], scale: Any, layout: Layout,
                shape: tuple[int, ...]) -> jax.Array:
    """`scale * kron(w1, w2)` as a weight of `shape` and `layout` (transposed to `[in, out]`,
    in its storage order), in float32; `scale` is a float or an array over the stacked axes."""
    stack, fan_in, fan_out = layout.split(shape)
    w1, w2 = (w.astype(jnp.float32) for w in kron_factors(leaves))
    scale = jnp.asarray(scale, jnp.float32).reshape(jnp.shape(scale) + (1, 1))
    delta = jnp.einsum("...ac,...bd->...cdab", w1 * scale, w2,
                       precision=jax.lax.Precision.HIGHEST)
    return layout.to_stored(delta.reshape(*stack, *fan_in, *fan_out))


_ONE_LINEAR = ("peft's LoKr adapts Linear layers (its Conv forms are not built here); the "
               "Kronecker factors split one input and one output dimension")


class LoKr(Variant):
    """LoKr: `W + alpha / r * kron(w1, w2)`, never formed in the forward."""

    name = "lokr"
    config = LoKrConfig
    peft_type = "LOKR"
    leaves = tuple(Leaf(n, axes, peft=f".{n}", optional=True) for n, axes in (
        (W1, "__"), (W1_A, "r_"), (W1_B, "_r"), (W2, "__"), (W2_A, "r_"), (W2_B, "_r")))
    kinds = ("dense",)
    unsupported = {
        "kinds": _ONE_LINEAR, "kept_axes": _ONE_LINEAR,
        "materialised": "target_parameters is a LoRA field; target the module instead",
        "adapter_sets": "its factors have no mixed-batch form here",
        "sweeps": "its factors have no mixed-batch form here",
        "combinations": "peft's add_weighted_adapter combines LoRA adapters only",
        "conversion": "its update is not a low-rank product of two factors"}
    # peft 0.21.2 `LoKrConfig().to_dict()` with save_pretrained's `inference_mode: true`.
    peft_defaults = {
        "alpha": 8, "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None,
        "decompose_both": False, "decompose_factor": -1, "exclude_modules": None,
        "inference_mode": True, "init_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "module_dropout": 0.0, "modules_to_save": None, "r": 8,
        "rank_dropout": 0.0, "rank_dropout_scale": False, "rank_pattern": {}, "revision": None,
        "target_modules": None, "task_type": None, "use_effective_conv2d": False}
    peft_fields = tuple(f.name for f in dataclasses.fields(LoKrConfig))

    def refuses(self, shape: tuple[int, ...], layout: Layout) -> str | None:
        if layout.n_in != 1:
            return f"its {layout.n_in} input axes: {_ONE_LINEAR}"
        return None

    def shapes(self, shape: tuple[int, ...], layout: Layout, rank: int, config: Any = None
               ) -> dict[str, tuple]:
        """The factors peft chooses for this weight, rank and `config` (see `leaf_shapes`)."""
        stack, fan_in, fan_out = layout.split(shape)
        return {n: (*stack, *s) for n, s in leaf_shapes(
            math.prod(fan_in), math.prod(fan_out), rank, config.decompose_factor,
            config.decompose_both).items()}

    def init(self, weight: Any, layout: Layout, config: Any, values: Any, key: jax.Array,
             dtype: Any, shared: Any = None) -> tuple[dict[str, jax.Array], Any]:
        if values.ranks:
            raise ValueError(
                "LoKr on a scanned stack whose layers get different ranks (rank_pattern): the "
                "rank decides which factors are full, so the layers cannot share stacked "
                "leaves; give its layers one rank, or use unscanned layers")
        return init_leaves(key, self.shapes(tuple(weight.shape), layout, values.rank, config),
                           config.init_weights, dtype), None

    def options(self, config: Any) -> tuple[tuple[str, Any], ...]:
        if not (config.rank_dropout or config.module_dropout):
            return ()
        return (("rank_dropout", config.rank_dropout), ("module_dropout", config.module_dropout),
                ("rank_dropout_scale", config.rank_dropout_scale))

    def forward(self, call: Any, leaves: Mapping[str, jax.Array], scale: Any) -> jax.Array:
        x = jnp.asarray(call.x, call.dtype)
        key = call.rng() if call.record.options else None  # None: evaluating
        mask = None if key is None else dropout_masks(key, call.out.shape[-1],
                                                      **dict(call.record.options))
        y = lokr_term(x, leaves, scale, mask, precision=getattr(call.module, "precision", None))
        return y.reshape(call.out.shape)

    def merge(self, weight: jax.Array, leaves: Mapping[str, jax.Array], scale: Any,
              layout: Layout) -> jax.Array:
        return weight + merge_delta(leaves, scale, layout, tuple(weight.shape))


register_variant(LoKr())
