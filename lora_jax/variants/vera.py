"""VeRA (peft's `VeraConfig`, arXiv 2310.11454; docs/guides/variants.md): one pair of frozen
random projections shared by every adapted layer, and two trained vectors per layer, as peft 0.21
does (read from `peft/tuners/vera` and checked by running it, tests/test_vera.py).

peft draws `vera_A [r, max_in]` then `vera_B [max_out, r]` from one
`torch.Generator().manual_seed(projection_prng_key)` (`max_in` / `max_out`: the largest input /
output sizes of the targeted layers, after `layers_to_transform`); a layer uses `A[:, :in]` and
`B[:out, :]`, buffers outside the trainable counts, and trains `vera_lambda_d [r]` and
`vera_lambda_b [out]`; no alpha, no scale. Its files hold per layer `<path>.vera_lambda_d` and
`.vera_lambda_b` (no `.weight`), with `save_projection=True` also `base_model.vera_A` / `vera_B`,
and `fan_in_fan_out` in `adapter_config.json` (True for GPT-2's Conv1D). peft refuses layers other
than Linear / Conv1D, and a second adapter whose layers or rank need larger projections.

Here, in JAX layout (`A = vera_A.T [max_in, r]`, `B = vera_B.T [r, max_out]`), `inject` draws
them once for all targeted weights (`Vera.prepare`) and keeps each weight's frozen slices
`vera_A [*in, r]`, `vera_B [r, *out]` beside it, so the forward, merge, sharding and both
frontends read them like any variant's leaves (the price: `r * (in + out)` frozen numbers a layer,
where peft holds references to one pair). numpy's `MT19937` is torch's Mersenne Twister, so the
projections of a `projection_prng_key` are peft's bit for bit: a file saved with
`save_projection=False` loads in peft exactly, and `load_peft` draws them for such a file as
peft does (`Vera.peft_shared_read`).

>>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
>>> model, x = nn.Dense(8), jnp.ones((2, 16))
>>> config = VeraConfig(r=4, target_modules=".*", init_weights=False)
>>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
...                          jax.random.key(1))
>>> sorted(k for k in params if k.startswith("vera")), lora_jax.count_parameters(params, config)[0]
(['vera_A', 'vera_B', 'vera_lambda_b', 'vera_lambda_d'], 12)
>>> out = lora_jax.wrap(model.apply, config)({"params": params}, x)
>>> bool(jnp.allclose(out, model.apply({"params": lora_jax.merge(params, config)}, x), atol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.config import AdapterConfig, is_number
from lora_jax.core.factors import Layout, kernel_delta
from lora_jax.variants import register_variant
from lora_jax.variants.base import Leaf, Variant


@dataclasses.dataclass(frozen=True)
class VeraConfig(AdapterConfig):
    """What to adapt with VeRA and how; field names, defaults and matching rules follow peft's
    `VeraConfig` (target_modules, layers_to_transform, layers_pattern, modules_to_save and
    task_type select modules as in `lora_jax.LoraConfig`).

    - `r`: the projections' rank (peft's default 256: VeRA trains only `r + out` numbers a layer).
    - `projection_prng_key`: the seed of peft's `torch.Generator` for the shared projections; the
      same key gives the same projections as peft.
    - `save_projection`: write the projections into the adapter file (peft's default; without
      them a reader must regenerate them from the key).
    - `vera_dropout`: dropout on the input of the projections.
    - `d_initial`: the initial value of every `vera_lambda_d`.
    - `bias`: "none" | "all" (every bias trains) | "vera_only" (biases of adapted modules).
    - `init_weights`: True: lambda_b = 0 (starts equal to the base); False: lambda_b = 1 and
      lambda_d ~ N(0, 1), a non-identity start for tests.

    >>> config = VeraConfig(r=16, target_modules=["q_proj", "v_proj"])
    >>> config.d_initial, config.save_projection
    (0.1, True)
    """

    r: int = 256
    target_modules: str | Sequence[str] | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    bias: Literal["none", "all", "vera_only"] = "none"
    modules_to_save: Sequence[str] | None = None
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._freeze()
        self._validate()

    def _validate(self) -> None:
        self._check_numbers(flags=("save_projection", "init_weights"), rates=("vera_dropout",))
        self._require(is_number(self.projection_prng_key, int), "projection_prng_key",
                      "an integer (a torch seed)")
        self._require(is_number(self.d_initial) and math.isfinite(self.d_initial), "d_initial",
                      "a finite number")
        self._require(self.bias in ("none", "all", "vera_only"), "bias",
                      "'none', 'all' or 'vera_only'")
        self._check_layer_selection("peft accepts it but then ignores layers_to_transform")

    @property
    def dropout(self) -> float:
        """The dropout rate on the projections' input (`vera_dropout`)."""
        return self.vera_dropout

    __hash__ = AdapterConfig.__hash__


# --- the shared projections -------------------------------------------------------------------

def _torch_generator(seed: int) -> np.random.MT19937:
    """numpy's MT19937 in the state of `torch.Generator().manual_seed(seed)` (torch seeds the
    twister with the low 32 bits by the reference `init_genrand`)."""
    key = np.empty(624, np.uint32)
    s = seed % 2**64 & 0xFFFFFFFF
    for i in range(624):
        key[i] = s
        s = (1812433253 * (s ^ (s >> 30)) + i + 1) & 0xFFFFFFFF
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    return generator


def _kaiming_uniform(generator: np.random.MT19937, shape: tuple[int, int]) -> np.ndarray:
    """peft's `_kaiming_init(shape, generator)`: torch's `uniform_(-bound, bound)` of a float32
    tensor, gain sqrt(2) (not LoRA's a = sqrt(5)), fan_in = shape[1] (torch draws 24 bits a
    number and maps them in double)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    low, high = float(np.float32(-bound)), float(np.float32(bound))
    bits = generator.random_raw(math.prod(shape)) & 0xFFFFFF
    return (bits * 2.0**-24 * (high - low) + low).astype(np.float32).reshape(shape)


def projections(config: VeraConfig, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared `A [fan_in, r]` and `B [r, fan_out]` (float32, JAX layout) that peft draws for
    `config.projection_prng_key` when the largest targeted layer sizes are `fan_in` / `fan_out`.

    >>> a, b = projections(VeraConfig(r=4), 8, 6)
    >>> a.shape, b.shape, bool(abs(a).max() <= (6 / 8) ** 0.5)
    ((8, 4), (4, 6), True)
    """
    generator = _torch_generator(config.projection_prng_key)
    vera_a = _kaiming_uniform(generator, (config.r, fan_in))
    vera_b = _kaiming_uniform(generator, (fan_out, config.r))
    return vera_a.T, vera_b.T


def layer_projections(a: Any, b: Any, shape: tuple[int, ...], layout: Layout,
                      where: str = "VeRA") -> tuple[jax.Array, jax.Array]:
    """One weight's slices of the shared `a [max_in, r]`, `b [r, max_out]`: `A [*stack, *in, r]`
    and `B [*stack, r, *out]` (the first `in` rows of A and `out` columns of B, as peft's
    `A[:, :in]`, `B[:out, :]`), repeated along the weight's stacked axes."""
    stack, fan_in, fan_out = layout.split(shape)
    n_in, n_out = math.prod(fan_in), math.prod(fan_out)
    if a.shape[0] < n_in or b.shape[1] < n_out:
        raise ValueError(
            f"{where}: the shared projections vera_A {tuple(a.shape[::-1])} / vera_B "
            f"{tuple(b.shape[::-1])} (peft's layout) are too small for a layer with {n_in} inputs "
            f"and {n_out} outputs: they must cover the largest targeted layer, as peft requires"
        )
    r = a.shape[1]
    a = jnp.broadcast_to(jnp.asarray(a)[:n_in].reshape(*fan_in, r), (*stack, *fan_in, r))
    b = jnp.broadcast_to(jnp.asarray(b)[:, :n_out].reshape(r, *fan_out), (*stack, r, *fan_out))
    return a, b


def shared_projections(layers: Sequence[tuple[Any, Any]], where: str = "VeRA"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The shared `A [max_in, r]`, `B [r, max_out]` rebuilt from the layers' slices (one `A [in,
    r]`, `B [r, out]` pair a layer), for a file; raises unless all are cut from one pair.

    >>> a, b = projections(VeraConfig(r=2), 5, 4)
    >>> full = shared_projections([(a[:3], b), (a, b[:, :1])])
    >>> bool((full[0] == a).all() and (full[1] == b).all())
    True
    """
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in layers]
    full_a = max((a for a, _ in pairs), key=len)
    full_b = max((b for _, b in pairs), key=lambda b: b.shape[1])
    for a, b in pairs:
        if not (np.array_equal(a, full_a[:len(a)]) and np.array_equal(b, full_b[:, :b.shape[1]])):
            raise ValueError(f"{where}: the layers' vera_A / vera_B are not slices of one shared "
                             "pair of projections (VeRA shares one): were they trained or changed?")
    return full_a, full_b


# --- the trained vectors and the delta ------------------------------------------------------

def init_lambdas(shape: tuple[int, ...], layout: Layout, config: VeraConfig, key: jax.Array,
                 dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """`lambda_d [*stack, r]` and `lambda_b [*stack, *out]` as peft initialises them:
    `d_initial` and 0 (the adapted layer starts equal to the base), or with
    `init_weights=False` N(0, 1) and 1."""
    stack, _, fan_out = layout.split(shape)
    d_shape, b_shape = (*stack, config.r), (*stack, *fan_out)
    if config.init_weights:
        return jnp.full(d_shape, config.d_initial, dtype), jnp.zeros(b_shape, dtype)
    return jax.random.normal(key, d_shape, dtype), jnp.ones(b_shape, dtype)


def scaled_projections(a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """`(A lambda_d, B lambda_b)`: the low-rank factors of a layer's VeRA delta, `[*stack, *in,
    r]` and `[*stack, r, *out]`, for `lambda_d [*stack, r]` and `lambda_b [*stack, *out]` (a
    call's delta is their low-rank product with `x`; merging adds their `kernel_delta`).

    >>> a, b = scaled_projections(jnp.ones((3, 2)), jnp.ones((2, 4)), jnp.array([1.0, 2.0]),
    ...                           jnp.arange(4.0))
    >>> (a @ b).tolist()[0]
    [0.0, 3.0, 6.0, 9.0]
    """
    stacked = lambda_d.ndim - 1
    n_in = a.ndim - stacked - 1
    d = lambda_d.reshape(*lambda_d.shape[:-1], *(1,) * n_in, lambda_d.shape[-1])
    return a * d, b * jnp.expand_dims(lambda_b, stacked)


def merge_delta(a: jax.Array, b: jax.Array, lambda_d: jax.Array, lambda_b: jax.Array,
                layout: Layout, shape: tuple[int, ...]) -> jax.Array:
    """`(A lambda_d) (B lambda_b)` laid out as the weight (float32): what merging adds."""
    return kernel_delta(*scaled_projections(a, b, lambda_d, lambda_b), layout, shape)


# --- the variant ------------------------------------------------------------------------------

_A, _B = "base_model.vera_A", "base_model.vera_B"


def _arrays(leaves: Mapping[str, Any]) -> tuple[Any, Any, Any, Any]:
    return (leaves["vera_A"], leaves["vera_B"], leaves["vera_lambda_d"],
            leaves["vera_lambda_b"])


class Vera(Variant):
    """VeRA behind the variant interface: frozen slices `vera_A [*in, r]`, `vera_B [r, *out]`
    and trained `vera_lambda_d [r]`, `vera_lambda_b [*out]` beside each adapted weight."""

    name = "vera"
    config = VeraConfig
    peft_type = "VERA"
    leaves = (Leaf("vera_A", "ir", trained=False), Leaf("vera_B", "ro", trained=False),
              Leaf("vera_lambda_d", "r", peft=".vera_lambda_d"),
              Leaf("vera_lambda_b", "o", peft=".vera_lambda_b"))
    kinds = ("dense", "einsum")  # a kernel that is a Linear of its flattened in / out axes
    _why = ("as in peft, VeRA adapts Linear layers (kernels of input and output axes) only; "
            "exclude this module")
    unsupported = {"kinds": _why, "kept_axes": _why, "materialised": _why,
                   "adapter_sets": "one shared pair of projections per adapter",
                   "sweeps": "one shared pair of projections per adapter",
                   "combinations": "peft combines LoRA adapters only",
                   "conversion": "VeRA is no LoRA of a smaller rank"}
    # peft 0.21.2 `VeraConfig().to_dict()` with save_pretrained's `inference_mode: true`.
    peft_defaults = {
        "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "d_initial": 0.1, "fan_in_fan_out": False, "inference_mode": True, "init_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "modules_to_save": None,
        "projection_prng_key": 0, "r": 256, "revision": None, "save_projection": True,
        "target_modules": None, "task_type": None, "vera_dropout": 0.0}
    peft_fields = tuple(f.name for f in dataclasses.fields(VeraConfig))
    peft_shared_keys = (_A, _B)

    def prepare(self, weights: list[tuple[Any, Layout]], config: Any, key: jax.Array) -> Any:
        sizes = [layout.split(w.shape)[1:] for w, layout in weights]
        return projections(config, max(math.prod(i) for i, _ in sizes),
                           max(math.prod(o) for _, o in sizes))

    def init(self, weight: Any, layout: Layout, config: Any, values: Any, key: jax.Array,
             dtype: jnp.dtype, shared: Any) -> tuple[dict[str, jax.Array], Any]:
        a, b = layer_projections(shared[0], shared[1], weight.shape, layout)
        d, lb = init_lambdas(weight.shape, layout, config, key, dtype)
        return {"vera_A": a.astype(dtype), "vera_B": b.astype(dtype), "vera_lambda_d": d,
                "vera_lambda_b": lb}, None

    def forward(self, call: Any, leaves: Mapping[str, jax.Array], scale: Any) -> jax.Array:
        return call.product(*scaled_projections(*_arrays(leaves)))

    def merge(self, weight: jax.Array, leaves: Mapping[str, jax.Array], scale: Any,
              layout: Layout) -> jax.Array:
        return weight + merge_delta(*_arrays(leaves), layout, weight.shape)

    def peft_shared(self, modules: Sequence[Mapping[str, Any]], config: Any) -> dict[str, Any]:
        a, b = shared_projections([(m["vera_A"], m["vera_B"]) for m in modules], "save_peft")
        if config.save_projection:
            return {_A: np.ascontiguousarray(a.T), _B: np.ascontiguousarray(b.T)}
        drawn = projections(config, a.shape[0], b.shape[1])
        if not (np.array_equal(a, drawn[0]) and np.array_equal(b, drawn[1])):
            raise ValueError("save_peft: save_projection=False, but the projections are not "
                             f"those of projection_prng_key={config.projection_prng_key}, which "
                             "peft would draw on load; save with save_projection=True")
        return {}

    def peft_shared_read(self, shared: Mapping[str, Any], weights: list[tuple[Any, Layout]],
                         config: Any) -> Mapping[str, Any]:
        if _A in shared and _B in shared:
            return shared
        # save_projection=False: peft draws them from projection_prng_key on load, as we do.
        a, b = self.prepare(weights, config, jax.random.key(0))
        return {**shared, _A: a.T, _B: b.T}

    def from_peft(self, arrays: dict[str, Any], shared: Mapping[str, Any],
                  shape: tuple[int, ...], layout: Layout) -> dict[str, Any]:
        a, b = layer_projections(shared[_A].T, shared[_B].T, shape, layout, "load_peft")
        return {**arrays, "vera_A": np.asarray(a), "vera_B": np.asarray(b)}


register_variant(Vera())
