"""`LoraRecord`: everything about one adapted weight, stored in the params tree beside its factors.

`{"kernel": W, "lora_A": A, "lora_B": B, "lora": LoraRecord(...)}`: a static pytree node (free
under `jit`, `grad`, optax, orbax) that `wrap`, `merge`, `split`, counting, sharding and peft io
read the layout, rule, rank and scale from, so a later config can never rescale the factors.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

from lora_jax import variants
from lora_jax.core.factors import MATERIALISE, Layout
from lora_jax.core.targets import join_path, same_value, submodules, unbox, without_leaves


def record_name(weight: str) -> str:
    """The leaf name of the record beside `weight`.

    >>> record_name("kernel"), record_name("embedding"), record_name("w")
    ('lora', 'lora_embedding', 'w_lora')
    """
    return {"kernel": "lora", "embedding": "lora_embedding"}.get(weight, f"{weight}_lora")


def scale_name(weight: str) -> str:
    """The leaf name of an array scale for `weight` (`lora_scale` for a kernel): present when the
    record's `scale` is None, e.g. one scale per stacked layer or per adapter of a set."""
    return record_name(weight) + "_scale"


@dataclasses.dataclass(frozen=True)
class LoraRecord:
    """One adapted weight: its name, layout (and rule), rank, scale and dropout rate.

    - `layers`: the adapted layers when only some of a scanned stack's are; the others hold
      zero factors.
    - `variant`: the adapter method (`lora_jax.variants`: "lora", "dora", ...), which says what
      arrays lie beside the weight; `form`: the variant's leaves this weight has when not all
      (`Variant.leaves_of`); `options`: its training-time options, `(name, value)` pairs
      (e.g. LoKr's rank dropout), which make the frontends hand the forward a dropout key.
    - `scale=None`: the scale is an array leaf (`scale_name`) shaped like the stacked axes (and
      the adapter axis), so it can differ per layer or adapter without recompiling.
    - `adapters=K > 0`: an adapter set (`lora_jax.adapters`): K adapters on an axis right after
      the stacked axes, `rank` their common, padded rank.
    - `ranks`: each stacked layer's rank when they differ (0 for layers left out); the arrays
      are zero-padded to `rank` along their rank axis, which gradient training keeps at zero.

    `inject` puts one beside each adapted weight (a static leaf, under `record_name(weight)`):

    >>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> model, x = nn.Dense(4), jnp.ones((1, 4))
    >>> config = lora_jax.LoraConfig(r=2, lora_alpha=4, target_modules=".*")
    >>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
    ...                          jax.random.key(1))
    >>> record = params[record_name("kernel")]
    >>> record.weight, record.layout.kind, record.rank, record.scale, sorted(record.keys.values())
    ('kernel', 'dense', 2, 2.0, ['lora_A', 'lora_B'])
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
    form: tuple[str, ...] | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def draws(self) -> bool:
        """Whether a training call draws a dropout key (LoRA dropout or the variant's own)."""
        return bool(self.dropout or self.options)

    @property
    def keys(self) -> dict[str, str]:
        """{the variant's leaf name: its name beside this weight}."""
        return {leaf.name: leaf.key(self.weight) for leaf in variants.of(self).leaves_of(self)}

    @property
    def arrays(self) -> tuple[str, ...]:
        """The names of the arrays this record describes beside the weight (the variant's)."""
        return tuple(self.keys.values())

    @property
    def trained(self) -> tuple[str, ...]:
        """The names of the arrays that train."""
        return tuple(leaf.key(self.weight) for leaf in variants.of(self).leaves_of(self)
                     if leaf.trained)

    def read(self, get: Callable[[str], Any]) -> tuple[dict[str, Any], Any]:
        """({leaf name: value}, scale) with `get(name)` reading a leaf beside the weight: the
        scale is the record's float or the array scale leaf (`scale_name`)."""
        leaves = {name: get(key) for name, key in self.keys.items()}
        return leaves, self.scale if self.scale is not None else get(scale_name(self.weight))

    @property
    def leaves(self) -> tuple[str, ...]:
        """Every leaf this record owns beside the weight: its arrays, the array scale (if
        any) and itself."""
        scale = (scale_name(self.weight),) if self.scale is None else ()
        return (*self.arrays, *scale, record_name(self.weight))

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
    def leaves(self) -> dict[str, Any]:
        """{the variant's leaf name: array}."""
        return self.record.read(self.module.__getitem__)[0]

    @property
    def factors(self) -> tuple[Any, Any]:
        """(A, B) of a LoRA (or DoRA) adapter."""
        return self.leaves["lora_A"], self.leaves["lora_B"]

    @property
    def scale(self) -> Any:
        """The record's float scale, or the array scale leaf (`[*stacked]`) beside it."""
        return self.record.read(self.module.__getitem__)[1]


def without_adapters(params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` without any adapter's leaves (arrays, array scales, records): the base."""
    return without_leaves(params, {(i.path, n) for i in iter_records(params)
                                   for n in i.record.leaves})


def check_same_base(first: Mapping[str, Any], other: Mapping[str, Any], who: str) -> None:
    """Raise unless `other`'s base (its tree without adapter leaves) is `first`'s: adapters
    combined (a set, a weighted adapter) share one frozen base. `who` names `other`."""
    mine, theirs = ({join_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        without_adapters(tree))} for tree in (first, other))
    if mine.keys() != theirs.keys():
        raise ValueError(f"{who} is over another model: its params differ in "
                         f"{', '.join(sorted(mine.keys() ^ theirs.keys())[:5])}")
    changed = next((path for path, value in theirs.items()
                    if not same_value(value, mine[path])), None)
    if changed is not None:
        raise ValueError(
            f"{who} changes {changed!r}, which is not a LoRA factor (trained biases or "
            "modules_to_save?): combined adapters share one frozen base, so they may hold only "
            "LoRA factors (peft refuses the same)")


def leading(record: LoraRecord) -> int:
    """The axes before one adapter's arrays' own (`Leaf.axes`): the stacked and kept axes."""
    return record.layout.leading


def target_path(path: str, weight: str, module: Mapping[str, Any]) -> str:
    """The module path of a weight: the dict's path, or `path.weight` when the dict holds
    several weights that could be adapted (a shared scope, e.g. Gemma's MLP)."""
    if weight in ("kernel", "embedding"):
        return path
    mine = owned(module)
    others = [k for k, v in module.items() if k != weight and not isinstance(v, Mapping)
              and k not in mine and getattr(v, "ndim", 0) >= 2]
    return f"{path}.{weight}" if others else path


def owned(module: Mapping[str, Any]) -> set[str]:
    """The leaves of a module dict that its adapters own (arrays, array scales, records)."""
    return {n for v in module.values() if isinstance(v, LoraRecord) for n in v.leaves}


def iter_records(params: Mapping[str, Any], prefix: str = "") -> Iterator[Adapted]:
    """Every adapted weight of a params tree, parents first."""
    for path, module in itertools.chain([(prefix, params)], submodules(params, prefix)):
        yield from (Adapted(path, module, v) for v in module.values() if isinstance(v, LoraRecord))


def records(params: Mapping[str, Any]) -> list[Adapted]:
    """The adapted weights of `params`; raises if there are none."""
    found = list(iter_records(params))
    if not found:
        raise ValueError("the params hold no LoRA factors: call lora_jax.inject (or load_peft) "
                         "first")
    return found


def check_assumed(params: Mapping[str, Any], layouts: Mapping[str, Layout] | None,
                  what: str) -> None:
    """Refuse to `what` (merge, save_peft) a square kernel whose `[in, out]` reading was
    assumed (inject / load_peft without `layouts=`, `Layout.assumed`) unless `layouts` (the
    model's, `lora_jax.layouts`) confirms it: stored `[out, in]`, it would get the transposed
    delta, which its shape cannot reveal. (Read wrongly, a non-square kernel fails on shapes in
    `wrap` and in peft.)"""
    for item in iter_records(params):
        shape = tuple(unbox(item.weight).shape)  # [*stacked, in, out]
        if not item.record.layout.assumed or shape[-2] != shape[-1]:
            continue
        known = None if layouts is None else layouts.get(item.target)
        if known is None:
            raise ValueError(
                f"{what}: {item.target!r} is a square kernel {shape} read as [in, out] from the "
                "tree alone (inject or load_peft without layouts=); stored [out, in] (a "
                "transformers FlaxConv1D, a custom layer) it would get the transposed delta and "
                "nothing could tell. Pass layouts=lora_jax.layouts(model, *example_inputs) to "
                f"inject / load_peft, or to {what} to confirm the reading")
        if known.kind != "dense" or (known.order or "io") != "io" or known.n_in != 1:
            raise ValueError(
                f"{what}: {item.target!r} was adapted as an [in, out] kernel, but the model reads "
                f"it as {known.order or known.kind!r}: inject / load_peft again with "
                "layouts=lora_jax.layouts(model, *example_inputs)")


def check_config(adapted: Adapted, config: Any) -> None:
    """Raise if `config` would give this weight another rank or scale than it was injected with.

    The record's values are the ones used; this catches a config that does not describe them.
    """
    if config is None:
        return
    path, record, scale = adapted.target, adapted.record, adapted.record.scale
    if scale is None or record.ranks is not None:
        return  # per layer / adapter values (the scale is data): the record decides

    def values(name: str) -> tuple[int, float]:
        rank = config.rank(name)
        return rank, config.scaling(name, rank=rank)

    def agrees(name: str) -> bool:
        rank, want = values(name)
        return rank == record.rank and abs(want - scale) <= 1e-9 * abs(scale)

    # A layer of a scanned stack is named by peft as `stack.<i>...`: rank/alpha patterns may
    # name it so (inject matched them per layer; all adapted layers agree).
    parts, layer = path.split("."), str((record.layers or (0,))[0])
    layer_names = [".".join([*parts[:k], layer, *parts[k:]]) for k in range(1, len(parts))]
    if agrees(path) or record.layout.stacked == 1 and any(map(agrees, layer_names)):
        return
    want_rank, want_scale = values(path)
    raise ValueError(
        f"{path!r} was adapted with r={record.rank}, scale={record.scale:g}, but this "
        f"LoraConfig gives r={want_rank}, scale={want_scale:g} (lora_alpha, use_rslora, "
        "rank_pattern or alpha_pattern differ). Pass the config used at inject / returned "
        "by load_peft"
    )
