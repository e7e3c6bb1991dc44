"""The `Variant` interface: everything an adapter method declares, so that inject, the forward,
merge, sharding, peft files, partition and the many-adapter tools serve it without knowing which
method it is.

A variant keeps arrays (`Leaf`s) beside each adapted weight. Each leaf's axes are written in role
letters after the weight's stacked and kept axes: "i" the weight's input axes, "o" its output
axes, "r" the rank, "_" an axis of the variant's own size (see `Variant.shapes`). From these
letters the core derives the leaf's shape, its sharding (input / output axes sharded as the
weight's, the rest replicated), its padding to another rank (sets, sweeps) and its peft layout
(torch's order: the axes reversed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lora_jax.core.config import AdapterConfig
from lora_jax.core.factors import Layout

_WHAT = {"kinds": "this kind of layer", "kept_axes": "weights with kept axes",
         "materialised": "weights without a layer rule (target_parameters)",
         "layer_selection": "layers_to_transform on a scanned stack (one stacked leaf)",
         "adapter_sets": "adapter sets", "sweeps": "sweeps",
         "combinations": "weighted combinations", "conversion": "conversion to a plain LoRA"}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array a variant keeps beside an adapted weight.

    - `name`: its leaf name beside a `kernel` (peft's attribute name); beside an `embedding` it is
      `embed_name` (default: `name`), beside any other weight `w` it is `w_<name>`.
    - `axes`: role letters of its axes after the stacked and kept ones ("i", "o", "r", "_").
    - `trained`: whether it trains (else it is frozen, e.g. VeRA's shared projections).
    - `peft`, `peft_embed`: its key suffix in peft's files (None: not written per module).
    - `optional`: a weight may be adapted without it (the variant's `init` and files say which
      of its leaves a weight has, e.g. LoKr's full or low-rank factors; `LoraRecord.form`).
    """

    name: str
    axes: str
    trained: bool = True
    embed_name: str | None = None
    peft: str | None = None
    peft_embed: str | None = None
    optional: bool = False

    def key(self, weight: str) -> str:
        """Its leaf name beside `weight`.

        >>> Leaf("lora_A", "ir", embed_name="lora_embedding_A").key("w")
        'w_lora_A'
        """
        if weight == "kernel":
            return self.name
        if weight == "embedding":
            return self.embed_name or self.name
        return f"{weight}_{self.name}"

    def peft_suffix(self, weight: str) -> str | None:
        return self.peft_embed if weight == "embedding" and self.peft_embed else self.peft

    def rank_axis(self, leading: int) -> int | None:
        """The rank axis of the stored leaf with `leading` stacked and kept axes, if any."""
        return None if "r" not in self.axes else leading + self.axes.index("r")

    def resize(self, value: Any, leading: int, rank: int) -> Any:
        """`value` (this leaf, after `leading` axes) cut or zero-padded to `rank` along its rank
        axis (zero padding changes no product and gets zero gradients); as it is without one.

        >>> Leaf("lora_B", "ro").resize(jnp.ones((2, 3)), 0, 4).shape
        (4, 3)
        """
        axis = self.rank_axis(leading)
        if axis is None:
            return value
        if value.shape[axis] >= rank:
            return jax.lax.slice_in_dim(value, 0, rank, axis=axis)
        return jnp.pad(value, [(0, rank - value.shape[axis]) if i == axis else (0, 0)
                               for i in range(value.ndim)])


class Variant:
    """An adapter method. Subclass it, set the class attributes, implement `init`, `forward`
    and `merge`, and `register_variant` an instance (see `lora_jax.variants.lora`).

    What it does not support is said once here (`unsupported`, with the reasons); inject,
    adapter sets, sweeps, weighted combinations and conversion raise it through `check`.
    """

    name: ClassVar[str]  # the record's `variant`
    config: ClassVar[type[AdapterConfig]]  # the config class it reads
    peft_type: ClassVar[str] = "LORA"
    leaves: ClassVar[tuple[Leaf, ...]]
    kinds: ClassVar[tuple[str, ...]] = ("dense", "conv", "embed", "einsum")
    # {what it does not support (a key of `_WHAT`; "kinds": a layer kind not in `kinds`): why}
    unsupported: ClassVar[Mapping[str, str]] = {}
    recomputes_base: ClassVar[bool] = False  # needs the rule's `base` under dropout
    # peft's adapter_config.json for this method: its fields with peft's defaults as its
    # `to_dict()` writes them, those the config class has, those that only describe the model
    # (any value loads), and translated values {field: ({peft's value: ours}, why others fail)}.
    # A field not ours, not informational and not at its default refuses to load.
    peft_defaults: ClassVar[Mapping[str, Any]] = {}
    peft_fields: ClassVar[tuple[str, ...]] = ()
    peft_informational: ClassVar[tuple[str, ...]] = ()
    peft_values: ClassVar[Mapping[str, tuple[Mapping[Any, Any], str]]] = {}
    peft_shared_keys: ClassVar[tuple[str, ...]] = ()  # file keys of `peft_shared` tensors

    def accepts(self, config: Any) -> bool:
        """Whether `config` asks for this variant."""
        return type(config) is self.config

    # --- leaves -------------------------------------------------------------------------------

    def names(self, weight: str) -> dict[str, str]:
        """{leaf name: name beside `weight`}."""
        return {leaf.name: leaf.key(weight) for leaf in self.leaves}

    def leaves_of(self, record: Any) -> tuple[Leaf, ...]:
        """The leaves a record's weight has: all, or those its `form` names."""
        return self.leaves if record.form is None else tuple(
            leaf for leaf in self.leaves if leaf.name in record.form)

    def form(self, names: Any) -> tuple[str, ...] | None:
        """The `LoraRecord.form` of a weight with the leaves `names` (None: all of them)."""
        present = tuple(leaf.name for leaf in self.leaves if leaf.name in names)
        return None if len(present) == len(self.leaves) else present

    def options(self, config: Any) -> tuple[tuple[str, Any], ...]:
        """The training-time options of `config` a record carries for the forward
        (`LoraRecord.options`; the forward draws their key with `call.rng()`); default: none."""
        return ()

    def prepare(self, weights: list[tuple[Any, Layout]], config: Any, key: jax.Array) -> Any:
        """What `init` shares across the weights one inject adapts (each weight with its
        layout), computed once: e.g. VeRA's projections sized for the largest weight."""
        return None

    def refuses(self, shape: tuple[int, ...], layout: Layout) -> str | None:
        """Why this variant cannot adapt a weight of this shape and layout, beyond `kinds` and
        `unsupported` (None: it can)."""
        return None

    def peft_shared(self, modules: Sequence[Mapping[str, Any]], config: Any) -> dict[str, Any]:
        """Tensors peft writes once per file, not per module (keys in full, e.g. VeRA's
        `base_model.vera_A`), from each adapted module's leaves (one layer's, numpy)."""
        return {}

    def peft_shared_read(self, shared: Mapping[str, Any], weights: list[tuple[Any, Layout]],
                         config: Any) -> Mapping[str, Any]:
        """A file's shared tensors (`peft_shared_keys`, as read), completed where the file
        leaves them out, for the `weights` it adapts (one layer's, each with its layout), as
        peft completes them on load; default: as they are."""
        return shared

    def from_peft(self, arrays: dict[str, Any], shared: Mapping[str, Any],
                  shape: tuple[int, ...], layout: Layout) -> dict[str, Any]:
        """One module's arrays read from a peft file (ours, by leaf name) completed from the
        file's shared tensors (`peft_shared`) for a weight of `shape`; default: as they are."""
        return arrays

    def shapes(self, shape: tuple[int, ...], layout: Layout, rank: int, config: Any = None
               ) -> dict[str, tuple]:
        """{leaf name: shape} for a weight of stored `shape` at `rank`, from the leaves' axes
        letters (a variant whose leaves have axes of their own sizes reads them from its
        `config`)."""
        stack, fan_in, fan_out = layout.split(shape)
        dims = {"i": fan_in, "o": fan_out, "r": (rank,)}
        return {leaf.name: (*stack, *(d for c in leaf.axes for d in dims[c]))
                for leaf in self.leaves}

    def resize(self, leaves: Mapping[str, Any], leading: int, rank: int) -> dict[str, Any]:
        """`leaves` ({leaf name: array}) cut or zero-padded to `rank` along their rank axes."""
        return {leaf.name: leaf.resize(leaves[leaf.name], leading, rank) for leaf in self.leaves
                if leaf.name in leaves}

    def rank_of(self, leaves: Mapping[str, Any], leading: int) -> int | None:
        """The rank of a module's leaves (the first leaf with a rank axis; None if none has
        one, e.g. LoKr's full factors: the config's rank then)."""
        leaf = next((leaf for leaf in self.leaves if "r" in leaf.axes and leaf.name in leaves),
                    None)
        return None if leaf is None else leaves[leaf.name].shape[leaf.rank_axis(leading)]

    def check(self, what: str, where: str) -> None:
        """Raise, naming `where` and the reason, if this variant does not support `what`."""
        if what in self.unsupported:
            raise ValueError(f"{where}: {self.name} does not support {_WHAT[what]}: "
                             f"{self.unsupported[what]}")

    # --- the method ---------------------------------------------------------------------------

    def init(self, weight: jax.Array, layout: Layout, config: Any, values: Any,
             key: jax.Array, dtype: jnp.dtype, shared: Any
             ) -> tuple[dict[str, jax.Array], Any]:
        """({leaf name: array in `dtype`}, the new base weight or None) for one adapted weight
        (`values`: its rank and scale, see `lora_jax.core.inject.Values`; `shared`: what
        `prepare` gave)."""
        raise NotImplementedError

    def forward(self, call: Any, leaves: Mapping[str, jax.Array], scale: Any) -> jax.Array:
        """What the adapter adds to the output of one call (`lora_jax.core.forward.Call`), from
        the leaves as the module sees them (no stacked axes)."""
        raise NotImplementedError

    def merge(self, weight: jax.Array, leaves: Mapping[str, jax.Array], scale: Any,
              layout: Layout) -> jax.Array:
        """The merged weight in float32 (`weight` is float32, in its storage order)."""
        raise NotImplementedError
