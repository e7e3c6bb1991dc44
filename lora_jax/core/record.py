"""`LoraRecord`: everything about one adapted weight, stored in the params tree beside its factors.

`inject` (and `load_peft`) put a record next to each adapted weight: `{"kernel": W, "lora_A": A,
"lora_B": B, "lora": LoraRecord(...)}`. The record is a static pytree node (no array leaves), so
it passes through `jit`, `grad`, `scan`, optax and orbax unchanged and costs nothing, while
`wrap`, `merge`, `split`, counting, sharding and peft io all read the facts from it instead of
re-deriving them: the layout (which axes are stacked, input, output; the storage order), the
layer rule, the rank and the scale. The scale travels with the factors, so a later config can
never silently rescale them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from lora_jax.core.factors import Layout

# The rule name of weights adapted by materialising W + scale * A B (no layer rule).
MATERIALISE = "materialise"


def factor_names(weight: str) -> tuple[str, str, str]:
    """(A, B, record) leaf names for the adapted `weight` (peft's names for kernel / embedding).

    >>> factor_names("kernel"), factor_names("w")
    (('lora_A', 'lora_B', 'lora'), ('w_lora_A', 'w_lora_B', 'w_lora'))
    """
    if weight == "kernel":
        return "lora_A", "lora_B", "lora"
    if weight == "embedding":
        return "lora_embedding_A", "lora_embedding_B", "lora_embedding"
    return f"{weight}_lora_A", f"{weight}_lora_B", f"{weight}_lora"


def scale_name(weight: str) -> str:
    """The leaf name of an array scale for `weight` (`lora_scale` for a kernel): present when the
    record's `scale` is None, e.g. one scale per stacked layer or per adapter of a set."""
    return factor_names(weight)[2] + "_scale"


def magnitude_name(weight: str) -> str:
    """The leaf name of DoRA's magnitude vector for `weight` (peft's `lora_magnitude_vector`)."""
    return "lora_magnitude_vector" if weight in ("kernel", "embedding") else \
        f"{weight}_lora_magnitude_vector"


def is_factor(name: str) -> bool:
    """Whether a leaf name is a trained LoRA leaf: A or B of any weight, or a DoRA magnitude."""
    return name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                    "lora_magnitude_vector") or \
        name.endswith(("_lora_A", "_lora_B", "_lora_magnitude_vector"))


@dataclasses.dataclass(frozen=True)
class LoraRecord:
    """One adapted weight: its name, layout (and rule), rank, scale and dropout rate.

    `layers` lists the stacked layers that are adapted when only some of a scanned stack's are
    (`layers_to_transform`); the others hold zero factors. `variant` is "lora" or "dora" (a
    magnitude vector beside the factors rescales each output feature). `scale=None`: the scale
    is data, an array leaf beside the factors (`scale_name`) shaped like the stacked axes (and
    the adapter axis), so it can differ per layer or adapter and change without recompiling.
    `adapters=K > 0`: an adapter set (`lora_jax.adapters`): the factors, magnitude and scale
    hold K adapters on an axis right after the stacked axes (`rank` is their common, padded
    rank). `ranks`: each stacked layer's own rank when the layers of a scanned stack differ
    (peft's rank_pattern naming layers; 0 for layers left out): the factors are padded to
    `rank` with zero columns of A / rows of B, which gradient training keeps at zero.
    """

    weight: str
    layout: Layout
    rank: int
    scale: float | None
    dropout: float = 0.0
    layers: tuple[int, ...] | None = None
    variant: str = "lora"
    adapters: int = 0
    ranks: tuple[int, ...] | None = None

    @property
    def names(self) -> tuple[str, str]:
        """The leaf names of A and B."""
        return factor_names(self.weight)[:2]

    @property
    def arrays(self) -> tuple[str, ...]:
        """The names of the trained arrays this record describes: A, B and DoRA's magnitude."""
        names = self.names
        return (*names, magnitude_name(self.weight)) if self.variant == "dora" else names

    @property
    def leaves(self) -> tuple[str, ...]:
        """Every leaf this record owns beside the weight: its arrays, the array scale (if
        any) and itself."""
        scale = (scale_name(self.weight),) if self.scale is None else ()
        return (*self.arrays, *scale, factor_names(self.weight)[2])

    @property
    def materialised(self) -> bool:
        """Whether the forward adds A B to the weight (no layer rule) instead of to the output."""
        return self.layout.rule == MATERIALISE


jax.tree_util.register_static(LoraRecord)


@dataclasses.dataclass(frozen=True)
class Adapted:
    """A record with where it lives: the module dict's path and the dict itself."""

    path: str  # of the module dict
    module: Mapping[str, Any]
    record: LoraRecord

    @property
    def target(self) -> str:
        """The path targets name this weight by (peft's module path, or path.param)."""
        return target_path(self.path, self.record.weight, self.module)

    @property
    def weight(self) -> Any:
        return self.module[self.record.weight]

    @property
    def factors(self) -> tuple[Any, Any]:
        a, b = self.record.names
        return self.module[a], self.module[b]

    @property
    def magnitude(self) -> Any:
        return self.module[magnitude_name(self.record.weight)]

    @property
    def scale(self) -> Any:
        """The record's float scale, or the array scale leaf (`[*stacked]`) beside it."""
        record = self.record
        return self.module[scale_name(record.weight)] if record.scale is None else record.scale

    @property
    def scaled_factors(self) -> tuple[Any, Any]:
        """(A, scale * B), an array scale broadcast along B's stacked axes."""
        a, b = self.factors
        return a, b * broadcast_scale(self.scale, b.ndim)


def broadcast_scale(scale: Any, ndim: int) -> Any:
    """A float, or an array scale over leading axes, shaped to multiply an `ndim` array."""
    if isinstance(scale, int | float):
        return scale
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def target_path(path: str, weight: str, module: Mapping[str, Any]) -> str:
    """The module path of a weight: the dict's path, or `path.weight` when the dict holds
    several weights that could be adapted (a shared scope, e.g. Gemma's MLP)."""
    if weight in ("kernel", "embedding"):
        return path
    others = [k for k, v in module.items() if k != weight and not isinstance(v, Mapping)
              and not is_factor(k) and not isinstance(v, LoraRecord)
              and getattr(v, "ndim", 0) >= 2]
    return f"{path}.{weight}" if others else path


def _config_values(config: Any, path: str) -> tuple[int, float]:
    rank = config.rank(path)
    return rank, config.scaling(path, rank=rank)


def _agrees(values: tuple[int, float], record: LoraRecord) -> bool:
    return values[0] == record.rank and abs(values[1] - record.scale) <= 1e-9 * abs(record.scale)


def _layer_names(path: str, layer: int) -> list[str]:
    """peft's names of one layer of the scanned module at `path`, for each place its stack's
    name may end."""
    parts = path.split(".")
    return [".".join([*parts[:k], str(layer), *parts[k:]]) for k in range(1, len(parts))]


def iter_records(params: Mapping[str, Any], prefix: str = "") -> Iterator[Adapted]:
    """Every adapted weight of a params tree, parents first."""
    for value in params.values():
        if isinstance(value, LoraRecord):
            yield Adapted(prefix, params, value)
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from iter_records(value, f"{prefix}.{key}" if prefix else key)


def records(params: Mapping[str, Any]) -> list[Adapted]:
    """The adapted weights of `params`; raises if there are none."""
    found = list(iter_records(params))
    if not found:
        raise ValueError("the params hold no LoRA factors: call lora_jax.inject (or load_peft) "
                         "first")
    return found


def check_config(adapted: Adapted, config: Any) -> None:
    """Raise if `config` would give this weight another rank or scale than it was injected with.

    The record's values are the ones used; this catches a config that does not describe them.
    """
    if config is None:
        return
    path, record = adapted.target, adapted.record
    if record.scale is None or record.ranks is not None:
        return  # per layer / adapter values (the scale is data): the record decides
    want_rank, want_scale = _config_values(config, path)
    if want_rank != record.rank or abs(want_scale - record.scale) > 1e-9 * abs(record.scale):
        # A layer of a scanned stack is named by peft as `stack.<i>...`: rank/alpha patterns
        # may name it so (inject matched them per layer; all adapted layers agree).
        if record.layout.stacked == 1 and any(
                _agrees(_config_values(config, name), record)
                for name in _layer_names(path, (record.layers or (0,))[0])):
            return
        raise ValueError(
            f"{path!r} was adapted with r={record.rank}, scale={record.scale:g}, but this "
            f"LoraConfig gives r={want_rank}, scale={want_scale:g} (lora_alpha, use_rslora, "
            "rank_pattern or alpha_pattern differ). Pass the config used at inject / returned "
            "by load_peft"
        )
