"""Read and write peft adapters (`adapter_model.safetensors` + `adapter_config.json`).

`save_peft` writes what peft 0.21's `save_pretrained` writes for the same model and config, so
`PeftModel.from_pretrained(hf_model, path)` loads it; `load_peft` puts a peft adapter onto a base
params tree and returns the config to `wrap` / `merge` it with. How module paths, layer stacks,
array layouts and the config's patterns map to peft's: docs/guides/peft.md, "The file format".

    save_peft("out/adapter", params, config, model_type="gpt2")
    params, config = load_peft("out/adapter", base_params, model_type="gpt2")
    logits = lora_jax.wrap(model.apply, config)({"params": params}, input_ids)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, overload

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import variants
from lora_jax.core.config import AdapterConfig, LoraConfig, alpha_for, scaling
from lora_jax.core.factors import Layout
from lora_jax.core.inject import Values, find_targets, new_record, per_layer
from lora_jax.core.jsonfile import read_json
from lora_jax.core.record import LoraRecord, check_assumed, owned, scale_name
from lora_jax.core.saved import is_original, keep_originals
from lora_jax.core.targets import (
    LIST_ELEMENT,
    PATH_ALIASES,
    hf_module_parts,
    iter_modules,
    matches,
    saved_name_match,
    with_leaves,
)
from lora_jax.peft import parameters
from lora_jax.peft.linear import as_linear, flatten, unflatten

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the peft release whose file format is written and checked

PathMap = Callable[[str], "str | None"] | Mapping[str, str]

# Fields of any peft config that only describe the file or the base model: any value loads.
_INFORMATIONAL = ("auto_mapping", "base_model_name_or_path", "fan_in_fan_out", "inference_mode",
                  "peft_type", "peft_version", "revision")
_WEIGHT_LEAVES = ("kernel", "embedding", "scale")


def _raw_leaf(name: str, node: Mapping[str, Any]) -> bool:
    """Whether `name` is a param kept under its PyTorch name and layout (fused experts'
    `gate_up_proj`, a router's `weight`: `lora_jax.models.stacking.hf_name`)."""
    return name in node and name not in (*_WEIGHT_LEAVES, "bias")


# --- module paths ---------------------------------------------------------------------------------

def _leaves(node: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if not isinstance(v, Mapping | LoraRecord)}


def _record(node: Mapping[str, Any], where: str) -> LoraRecord | None:
    """The record of the module's adapted kernel or embedding; raises for weights peft's files
    cannot name."""
    records = [v for v in node.values() if isinstance(v, LoraRecord)
               and not parameters.is_expert(v.layout)]
    for record in records:
        if record.weight not in ("kernel", "embedding") or record.materialised:
            raise ValueError(
                f"{where}: the adapted weight {record.weight!r} (rule {record.layout.rule}) has "
                "no peft file format; peft interop covers Dense-like kernels and Embed tables"
            )
    return records[0] if records else None


def _order(model_type: str | None, module: str, weights: Sequence[str]) -> list[str]:
    """`weights` of one module in its PyTorch parameter order (the architecture's
    `parameter_order`, by the module's name), which decides peft's nesting of their factors."""
    arch = _architecture(model_type)
    order = tuple((arch.parameter_order if arch else {}).get(module.rsplit(".", 1)[-1], ()))
    if len(weights) > 1 and not set(weights) <= set(order):
        raise ValueError(f"{module}: several adapted parameters {sorted(weights)}; pass "
                         "model_type= so that their PyTorch order (peft's nesting) is known")
    return sorted(weights, key=lambda w: order.index(w) if w in order else 0)


def _infer_stacks(params: Mapping[str, Any], plain: str = "") -> tuple[str, ...]:
    """Stack paths from sibling keys `x_0 ... x_{n-1}` (GPT-2's `ln_1, ln_2` are no list)."""
    indices: dict[str, list[int]] = {}
    for key in params:
        if (m := LIST_ELEMENT.fullmatch(key)) and isinstance(params[key], Mapping):
            indices.setdefault(m[1], []).append(int(m[2]))
    lists = {b for b, found in indices.items() if sorted(found) == list(range(len(found)))}
    out = tuple(f"{plain}.{b}" if plain else b for b in sorted(lists))
    for key, value in params.items():
        if isinstance(value, Mapping):
            m = LIST_ELEMENT.fullmatch(key)
            name = m[1] if m and m[1] in lists else key
            out += _infer_stacks(value, f"{plain}.{name}" if plain else name)
    return tuple(dict.fromkeys(out))


def _walk(path: str, stacks: Sequence[str]) -> tuple[list[str], int | None]:
    """The PyTorch components of a Flax path (list elements `h_0` -> `h`, `0`) and the index of
    the Flax component naming a scanned stack (a stack's name without an index), if any."""
    out, scanned = hf_module_parts(path, stacks)
    if len(scanned) > 1:
        raise ValueError(f"{path!r} lies in two scanned stacks; peft interop supports one")
    return out, scanned[0] if scanned else None


class _Slot:
    """One PyTorch module: where it lives in the Flax tree (and at which layer if scanned)."""

    def __init__(self, flax_path: str, layer: int | None, node: Mapping[str, Any]) -> None:
        self.flax_path, self.layer, self.node = flax_path, layer, node

    def leaf(self, name: str) -> Any:
        value = self.node[name]
        return value if self.layer is None else value[self.layer]

    def adapts(self, record: LoraRecord) -> bool:
        """Whether `record` adapts this layer (a scanned stack's record may leave layers out)."""
        return self.layer is None or record.layers is None or self.layer in record.layers


def _slot_values(record: LoraRecord, slot: _Slot) -> tuple[int, float]:
    """(rank, scale) of one module: a scanned stack's layer may have its own (the record's
    `ranks`, the array scale beside the factors)."""
    rank = record.rank if record.ranks is None or slot.layer is None else record.ranks[slot.layer]
    if record.scale is not None:
        return rank, record.scale
    return rank, float(np.asarray(slot.leaf(scale_name(record.weight))))


def _index(params: Mapping[str, Any], stacks: Sequence[str] | None, path_map: PathMap | None,
           model_type: str | None = None) -> dict[str, _Slot]:
    """{PyTorch module path: slot} for every module of the Flax tree that holds arrays; the
    stacks are `stacks`, else the architecture's, else inferred."""
    arch = _architecture(model_type)
    stacks = tuple(stacks) if stacks is not None else arch.stacks if arch else _infer_stacks(params)
    to_torch: Callable[[str], str | None] | None = (
        path_map.get if isinstance(path_map, Mapping) else path_map)
    index: dict[str, _Slot] = {}
    for flax_path, node in iter_modules(params, leaves=None):
        _, scanned = _walk(flax_path, stacks)
        n_layers = 0 if scanned is None else next(iter(_leaves(node).values())).shape[0]
        for layer in range(n_layers) if scanned is not None else [None]:
            # The Flax path in unscanned form (`h` -> `h_<i>`) and its PyTorch path.
            parts = flax_path.split(".")
            if layer is not None and scanned is not None:
                parts[scanned] += f"_{layer}"
            flax_form = ".".join(parts)
            torch_path = to_torch(flax_form) if to_torch else (
                PATH_ALIASES.get(flax_form) or ".".join(_walk(flax_form, stacks)[0]))
            if torch_path is None:
                continue
            if torch_path in index:
                raise ValueError(
                    f"two Flax modules map to the PyTorch path {torch_path!r}: "
                    f"{index[torch_path].flax_path!r} and {flax_path!r}; fix path_map/stacks"
                )
            index[torch_path] = _Slot(flax_path, layer, node)
    return index


class Architecture(Protocol):
    """What peft io reads of an architecture (`lora_jax.models.registry.Architecture` documents
    each field; a user may register any object with these attributes)."""

    @property
    def stacks(self) -> tuple[str, ...]: ...
    @property
    def fan_in_fan_out(self) -> bool: ...
    @property
    def base_model_class(self) -> str | None: ...
    @property
    def parent_library(self) -> str | None: ...
    @property
    def peft_unused(self) -> Mapping[str, str]: ...
    @property
    def parameter_order(self) -> Mapping[str, tuple[str, ...]]: ...


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(model_type: str, facts: Architecture) -> None:
    """Make `model_type=` name an architecture in `save_peft` / `load_peft`."""
    _ARCHITECTURES[model_type] = facts


@overload
def _architecture(model_type: str) -> Architecture: ...
@overload
def _architecture(model_type: str | None) -> Architecture | None: ...
def _architecture(model_type: str | None) -> Architecture | None:
    if model_type is None:
        return None
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"unknown model_type {model_type!r}: import lora_jax.models (which registers "
            "its architectures), call lora_jax.peft.files.register_architecture, or pass "
            "stacks= and fan_in_fan_out= instead"
        )
    return _ARCHITECTURES[model_type]


def _warn_unused(model_type: str | None, adapted: Sequence[str], what: str,
                 index: Mapping[str, _Slot], modules_to_save: Sequence[str] | None) -> None:
    """Warn when an adapted module, or a module in modules_to_save, is one that peft's model
    never calls (see Architecture)."""
    arch = _architecture(model_type)
    why = arch.peft_unused if arch else {}
    for path in sorted(set(adapted) & why.keys()):
        warnings.warn(
            f"{what}: {path!r} is adapted, but peft with transformers 5 never applies an adapter "
            f"on it ({why[path]}): peft's logits stay the base model's. lora_jax "
            "applies it to the lookups, as a LoRA on this module is meant to", stacklevel=3)
    saved = {p for p in index if _saved_root(p, modules_to_save) is not None}
    for path in sorted(saved & why.keys()):
        warnings.warn(
            f"{what}: {path!r} is in modules_to_save, but peft with transformers 5 never calls its "
            f"trained copy ({why[path]}): peft's logits stay the base model's. "
            "lora_jax's lookups use the trained table (its tied head keeps the original, as in "
            "peft)", stacklevel=3)


# --- config ---------------------------------------------------------------------------------------

def _shape_tree(index: Mapping[str, _Slot]) -> tuple[dict[str, Any], dict[str, Layout]]:
    """A tree keyed by PyTorch paths holding each module's weight shape (per layer), with
    layouts, so `find_targets` applies peft's matching rules to the PyTorch names."""
    tree: dict[str, Any] = {}
    layouts = {}
    for path, slot in index.items():
        names = [n for n in ("kernel", "embedding") if n in slot.node]
        if not names:
            continue
        weight = slot.leaf(names[0])
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
        node[names[0]] = jax.ShapeDtypeStruct(weight.shape, weight.dtype)
        layouts[path] = _plain_layout(names[0], n_in=weight.ndim - 1)
    return tree, layouts


def _selected(config: AdapterConfig, tree: Mapping[str, Any], layouts: Mapping[str, Layout],
              peft_quirks: bool = False) -> set[str] | None:
    """The modules `config` targets in `tree` (peft's rules), or None if it targets none;
    modules_to_save names absent from the tree are dropped first (peft's task models add both
    "classifier" and "score", a model has at most one)."""
    if config.modules_to_save:
        present = [m for m in config.modules_to_save
                   if any(_saved_root(p, [m]) for p, _ in iter_modules(tree, leaves=None))]
        config = config.replace(modules_to_save=present or None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return set(find_targets(tree, config, layouts, peft_quirks=peft_quirks))
    except ValueError:
        return None


def _agreeing(config: AdapterConfig, tree: Mapping[str, Any], layouts: Mapping[str, Layout],
              adapted: Mapping[str, tuple[int, float] | None], *, for_peft: bool = False
              ) -> AdapterConfig:
    """`config`, or a copy with explicit paths, such that matching it against the paths of `tree`
    selects exactly the `adapted` modules ({path: (rank, alpha)}) with their ranks and alphas
    (`for_peft`: as peft's code selects, full names skipping layers_to_transform).
    `target_parameters` stay as given."""
    if not config.target_modules:
        return config
    kept = config.target_parameters  # None also for a config without the field (VeRA, LoKr)
    if kept:
        config = config.replace(target_parameters=None)
    fields = config.to_dict()
    if _selected(config, tree, layouts) != set(adapted) or for_peft and _selected(
            config, tree, layouts, peft_quirks=True) != set(adapted):
        fields.update(target_modules=sorted(adapted), exclude_modules=None,
                      layers_to_transform=None, layers_pattern=None)
    # The file lists the patterns with sorted keys (json sort_keys, as peft writes it), and
    # peft takes the first key that matches: check them in that order too.
    read_back = config.replace(**{name: dict(sorted(getattr(config, name).items()))
                                  for name in ("rank_pattern", "alpha_pattern") if name in fields})
    # A stack with per-layer values (None) keeps the patterns that gave them.
    given = {p: v for p, v in adapted.items() if v is not None}
    for name, value_of in (("rank_pattern", 0), ("alpha_pattern", 1)):
        getters = [c.rank if value_of == 0 else c.alpha_of for c in (config, read_back)]
        if name in fields and any(getter(p) != v[value_of] for p, v in given.items()
                                  for getter in getters):
            default = config.r if name == "rank_pattern" else config.default_alpha
            fields[name] = {re.escape(p): v[value_of] for p, v in sorted(given.items())
                            if v[value_of] != default}
    agreed = type(config).from_dict(fields)
    return agreed.replace(target_parameters=kept) if kept else agreed


def _peft_fields(config: AdapterConfig, *, fan_in_fan_out: bool,
                 base_model_name_or_path: str | None, auto_mapping: dict | None
                 ) -> dict[str, Any]:
    variant = variants.for_config(config)
    fields = {**variant.peft_defaults, "peft_type": variant.peft_type, "peft_version": PEFT_VERSION,
              **{k: v for k, v in config.to_dict().items() if k in variant.peft_fields}}
    if isinstance(fields.get("layers_to_transform"), int):
        fields["layers_to_transform"] = [fields["layers_to_transform"]]
    if "fan_in_fan_out" in variant.peft_defaults:
        fields["fan_in_fan_out"] = fan_in_fan_out
    elif fan_in_fan_out:
        raise ValueError(f"save_peft: peft's {variant.peft_type} has no fan_in_fan_out: it adapts "
                         "torch Linear layers, not GPT-2's Conv1D ([in, out] weights)")
    fields.update(base_model_name_or_path=base_model_name_or_path, auto_mapping=auto_mapping)
    return fields


def _config_from_peft(fields: Mapping[str, Any], where: str) -> AdapterConfig:
    """Our config from an adapter_config.json dict (its variant's config class, by
    `peft_type`); raises on what lora_jax cannot apply."""
    found = [v for v in variants.registered() if v.peft_type == fields.get("peft_type")]
    if not found:
        known = sorted({v.peft_type for v in variants.registered()})
        raise ValueError(f"{where}: peft_type is {fields.get('peft_type')!r}; lora_jax loads "
                         f"peft_type {known} adapters")
    variant = found[0]  # variants written under one peft_type share its config fields
    for name, value in fields.items():
        if name in variant.peft_fields or name in _INFORMATIONAL + variant.peft_informational:
            continue
        default = variant.peft_defaults.get(name)
        if value != default and value not in (None, False, {}, []):
            raise ValueError(
                f"{where}: {name}={value!r} is not supported by lora_jax (it changes the "
                f"adapter's math or format; only {name}={default!r} loads)"
            )
    ours = {k: fields[k] for k in variant.peft_fields if k in fields}
    for name, (values, why) in variant.peft_values.items():
        if name in ours:
            if ours[name] not in values:
                raise ValueError(f"{where}: {name}={ours[name]!r} {why}")
            ours[name] = values[ours[name]]
    if ours.get("modules_to_save"):
        ours["modules_to_save"] = list(dict.fromkeys(ours["modules_to_save"]))
    try:
        return variant.config.from_dict(ours)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid {variant.config.__name__}: {e}") from e


# --- save -----------------------------------------------------------------------------------------

def _torch_weight(name: str, value: Any, fan_in_fan_out: bool, key: str) -> np.ndarray:
    value = np.asarray(value)
    if name == "kernel":
        if value.ndim != 2:
            raise ValueError(f"{key}: a kernel of shape {value.shape} has no PyTorch Linear "
                             "layout; peft interop supports Dense (2-D) kernels only")
        return value if fan_in_fan_out else value.T
    return value


def _saved_modules(modules_to_save: Sequence[str] | None, paths: Mapping[str, str]
                   ) -> Sequence[str] | None:
    """`modules_to_save` for the other naming: `paths` maps each module's name in the other
    naming to its name in ours. Kept as is if it selects the same modules there, else the
    explicit names of the selected modules."""
    if not modules_to_save:
        return modules_to_save
    ours = {other for other, path in paths.items() if _saved_root(path, modules_to_save)}
    theirs = {other for other in paths if _saved_root(other, modules_to_save)}
    return list(modules_to_save) if ours == theirs else sorted(ours)


def _saved_root(path: str, modules_to_save: Sequence[str] | None) -> str | None:
    """The outermost module on `path` that `modules_to_save` names (peft: its name ends with an
    entry), if any."""
    if not modules_to_save:
        return None
    parts = path.split(".")
    prefixes = (".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return next((p for p in prefixes if saved_name_match(modules_to_save, p)), None)


def save_peft(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    config: AdapterConfig,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    *,
    model_type: str | None = None,
    stacks: Sequence[str] | None = None,
    path_map: PathMap | None = None,
    fan_in_fan_out: bool | None = None,
    base_model_class: str | None = None,
    initial_params: Mapping[str, Any] | None = None,
    layouts: Mapping[str, Layout] | None = None,
) -> None:
    """Write `params`' adapter as peft's `adapter_model.safetensors` + `adapter_config.json`.

    `model_type` (a `lora_jax.models` architecture, e.g. "gpt2") gives the layer stacks,
    `fan_in_fan_out` and the kernels' layout (`[in, out]`); without it a square kernel is refused
    unless `layouts=lora_jax.layouts(model, x)` confirms that reading. `task_type` (peft's, e.g.
    "SEQ_CLS", whose file saves the "classifier" / "score" head) sets the config's, which must
    not be another; without one, peft's `auto_mapping` is recorded from `base_model_class`
    (default: the architecture's). Factors keep their dtype. `initial_params` (the params right
    after `inject`) converts a PiSSA / OLoRA adapter to a plain LoRA of the original base
    (`lora_jax.core.convert.to_plain_lora`, peft's `path_initial_model_for_weight_conversion`);
    without it the file needs the residual base.

    >>> import os, tempfile, flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> base = {"proj": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]}
    >>> config = lora_jax.LoraConfig(r=2, target_modules=["proj"])
    >>> params = lora_jax.inject(base, config, jax.random.key(1))
    >>> with tempfile.TemporaryDirectory() as folder:  # e.g. model_type="gpt2" for GPT-2
    ...     save_peft(folder, params, config)
    ...     sorted(os.listdir(folder))
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    if task_type is not None and task_type != config.task_type:
        if config.task_type is not None:
            raise ValueError(f"save_peft: task_type={task_type!r} but the config's is "
                             f"{config.task_type!r}; pass one of them")
        config = config.replace(task_type=task_type)
    if initial_params is not None:
        from lora_jax.core.convert import to_plain_lora

        if not isinstance(config, LoraConfig):
            raise ValueError(f"save_peft: initial_params converts a PiSSA / OLoRA LoraConfig "
                             f"adapter; a {type(config).__name__} has no such init")
        params, config = to_plain_lora(params, initial_params, config)
    params = as_linear(params)
    if model_type is None:  # a lora_jax.models architecture stores its kernels [in, out]
        check_assumed(params, layouts, "save_peft")
    if fan_in_fan_out is None:
        fan_in_fan_out = model_type is not None and _architecture(model_type).fan_in_fan_out
    index = _index(params, stacks, path_map, model_type)
    saved_modules = _saved_modules(config.modules_to_save, {p: s.flax_path for p, s in
                                                            index.items()})
    tensors: dict[str, np.ndarray] = {}
    adapted: dict[str, tuple[int, float]] = {}
    adapted_parameters: set[str] = set()
    shared: list[dict[str, np.ndarray]] = []  # each adapted module's arrays, for peft_shared
    for torch_path, slot in index.items():
        node, key = slot.node, PREFIX + torch_path
        record = _record(node, slot.flax_path)
        # A layer of a scanned stack that the record leaves out holds zero factors: not adapted.
        if record is not None and not slot.adapts(record):
            record = None
        has = record is not None
        if record is not None:
            weight = slot.leaf(record.weight)
            if weight.ndim != 2:
                raise ValueError(
                    f"{slot.flax_path!r}: a weight of shape {tuple(weight.shape)} per layer has no "
                    "PyTorch Linear/Embedding layout; peft interop supports nn.Dense and nn.Embed "
                    "(pass model_type/stacks if this is a scanned stack)"
                )
            r, scale = _slot_values(record, slot)
            arrays = {leaf: np.asarray(leaf.resize(slot.leaf(leaf.key(record.weight)), 0, r))
                      for leaf in variants.of(record).leaves_of(record)}
            for leaf, value in arrays.items():
                suffix = leaf.peft_suffix(record.weight)
                if suffix:  # torch's order: the axes reversed
                    tensors[key + suffix] = value.T
            shared.append({leaf.name: value for leaf, value in arrays.items()})
            # alpha from the record's scale: the value the factors were trained with.
            alpha = alpha_for(scale, r, config.use_rslora)
            given = config.alpha_of(torch_path)
            adapted[torch_path] = (r, given if abs(given - alpha) <= 1e-9 * abs(alpha)
                                   else alpha)
        root = _saved_root(torch_path, saved_modules)
        for name in _leaves(node):
            if name in owned(node) or is_original(name):
                continue
            value = slot.leaf(name)
            if root is not None:
                hf = name if _raw_leaf(name, node) else "bias" if name == "bias" else "weight"
                tensors[f"{key}.{hf}"] = _torch_weight(name, value, fan_in_fan_out, key)
                if name == "bias" and config.bias == "all":
                    rest = torch_path[len(root) + 1:]
                    parts = (root, "modules_to_save", rest, "bias")
                    tensors[PREFIX + ".".join(p for p in parts if p)] = np.asarray(value)
            elif name == "bias" and (config.bias == "all" or (config.adapted_biases and has)):
                tensors[key + (".base_layer.bias" if has else ".bias")] = np.asarray(value)
        experts = [v for v in node.values() if isinstance(v, LoraRecord)
                   and parameters.is_expert(v.layout) and slot.adapts(v)]
        for record in experts:  # target_parameters: per-expert factors, peft's fused layout
            r, scale = _slot_values(record, slot)
            a, b = (np.asarray(slot.leaf(record.keys[n])) for n in ("lora_A", "lora_B"))
            at = PREFIX + parameters.module_path(torch_path, record.weight, _order(
                model_type, torch_path, [e.weight for e in experts]))
            tensors[at + ".lora_A.weight"], tensors[at + ".lora_B.weight"] = parameters.to_peft(
                a[..., :r], b[..., :r, :])
            name = f"{torch_path}.{record.weight}"
            if r != config.rank(name) or abs(scale - config.scaling(name)) > 1e-9 * scale:
                raise ValueError(f"save_peft: {name} has r={r}, scale={scale:g}, not the "
                                 "config's r and lora_alpha for it (peft reads those)")
            adapted_parameters.add(name)
    mapped = {s.flax_path for s in index.values()}
    unmapped = [p for p, node in iter_modules(params, leaves=None) if p not in mapped
                and owned(node)]
    if unmapped:
        raise ValueError(f"save_peft: path_map gives no PyTorch path for the adapted modules "
                         f"{unmapped}")
    if not adapted and not adapted_parameters:
        raise ValueError("save_peft: the params hold no LoRA factors (was inject applied?)")
    tensors.update(variants.for_config(config).peft_shared(shared, config))
    _warn_unused(model_type, list(adapted), "save_peft", index, saved_modules)
    tree, layouts = _shape_tree(index)
    torch_config = _agreeing(config, tree, layouts, adapted, for_peft=True)
    if tuple(saved_modules or ()) != tuple(config.modules_to_save or ()):
        torch_config = torch_config.replace(modules_to_save=saved_modules)
    auto_mapping = None
    if config.task_type is None and model_type is not None:
        arch = _architecture(model_type)
        auto_mapping = {"base_model_class": base_model_class or arch.base_model_class,
                        "parent_library": arch.parent_library}
    fields = _peft_fields(torch_config, fan_in_fan_out=fan_in_fan_out,
                          base_model_name_or_path=base_model_name_or_path,
                          auto_mapping=auto_mapping)
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    # safetensors writes an array's buffer as is: transposed views must be made contiguous.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        f.write(json.dumps(fields, indent=2, sort_keys=True))


# --- load -----------------------------------------------------------------------------------------

def _parse_key(key: str, config: AdapterConfig) -> tuple[str, str, str] | None:
    """(kind, PyTorch module path, leaf) of a file key, None for a key to skip. kind: "factor",
    "bias", "base" (a base weight peft saved) or "saved" (a leaf of a module to save)."""
    if not key.startswith(PREFIX):
        raise ValueError(f"load_peft: key {key!r} does not start with {PREFIX!r}; is this a "
                         "peft LoRA adapter?")
    name = key[len(PREFIX):]
    for factor in variants.for_config(config).leaves:
        for suffix in (factor.peft, factor.peft_embed):
            if suffix is not None and name.endswith(suffix):
                return "factor", name[: -len(suffix)], suffix
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    for marker in ("modules_to_save", "original_module"):
        if marker in parts:
            at = parts.index(marker)
            root = ".".join(parts[:at])
            if _saved_root(root, config.modules_to_save) != root:
                raise ValueError(f"load_peft: {key!r}: {root!r} is not in modules_to_save")
            if marker == "original_module":
                return None  # the frozen original, which the base tree holds
            # peft keeps the adapter name after the marker in some keys (bias="all" collects
            # every bias, `pooler.modules_to_save.default.dense.bias`).
            skip = 2 if at + 1 < len(parts) and parts[at + 1] == "default" else 1
            module = ".".join(parts[:at] + parts[at + skip:])
    if leaf == "weight" and module.endswith(".base_layer"):
        # peft saves a targeted embedding / lm_head's base weight (save_embedding_layers="auto",
        # in case the vocabulary was resized): the base tree holds it already.
        return "base", module.removesuffix(".base_layer"), "weight"
    if _saved_root(module, config.modules_to_save) is not None:
        return "saved", module, leaf
    if leaf == "bias":
        return "bias", module.removesuffix(".base_layer"), "bias"
    raise ValueError(f"load_peft: {key!r} is not a LoRA factor, a bias or a modules_to_save "
                     "weight; lora_jax cannot place it")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json's fields, adapter_model.safetensors' tensors) of a peft adapter
    folder, checked as files: a missing, non-UTF-8 or invalid JSON config, a config that is not
    a JSON object, an unreadable safetensors file, a LoRA factor that is not a float and a
    float tensor holding NaN or inf are ValueErrors naming the file (and the tensor)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config_file, weights_file = (os.path.join(path, n) for n in (CONFIG_NAME, WEIGHTS_NAME))
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise ValueError(f"load_peft: no {file!r} (lora_jax reads peft's safetensors "
                             "adapters: adapter_config.json + adapter_model.safetensors)")
    fields = read_json(config_file)
    if not isinstance(fields, dict):
        raise ValueError(f"{config_file} is not a JSON object but a {type(fields).__name__}")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {weights_file} (truncated or corrupt?): {err}") from None
    suffixes = tuple({s for v in variants.registered() for leaf in v.leaves
                      for s in (leaf.peft, leaf.peft_embed) if s})
    for key, value in sorted(tensors.items()):
        floating = jnp.issubdtype(value.dtype, jnp.floating)
        if not floating and key.endswith(suffixes):
            raise ValueError(f"{weights_file}: tensor {key} is {value.dtype.name}, not a float: "
                             "not a LoRA adapter lora_jax can use")
        if floating and not np.isfinite(value.astype(np.float32)).all():
            raise ValueError(f"{weights_file}: tensor {key} holds NaN or infinite values (the "
                             "adapter of a diverged run?)")
    return fields, tensors


def load_peft(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    *,
    model_type: str | None = None,
    stacks: Sequence[str] | None = None,
    path_map: PathMap | None = None,
    layouts: Mapping[str, Layout] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[dict[str, Any], AdapterConfig]:
    """(params with the adapter, its LoraConfig) from a peft adapter directory.

    The factors are cast to `dtype` (so bfloat16 adapters load too), biases and modules_to_save
    weights to the dtype of the leaf they replace. Every tensor is checked (names, shapes, ranks,
    the config's targets) before the tree is built: a bad adapter raises a ValueError naming the
    key. Kernel layouts come from `layouts` (`lora_jax.layouts(model, x)`) or `model_type`;
    without either, 2-D kernels are read as `[in, out]` on trust, and `merge` / `save_peft`
    refuse a square one until confirmed.

    >>> import tempfile, flax.linen as nn, jax, jax.numpy as jnp, lora_jax
    >>> base = {"proj": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]}
    >>> config = lora_jax.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    >>> params = lora_jax.inject(base, config, jax.random.key(1))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_peft(folder, params, config)
    ...     loaded, loaded_config = load_peft(folder, base)  # e.g. model_type="gpt2"
    >>> loaded_config.r, loaded_config.target_modules
    (2, ('proj',))
    >>> bool(jnp.array_equal(loaded["proj"]["lora_B"], params["proj"]["lora_B"]))
    True
    """
    fields, tensors = read_adapter(path)
    where = f"load_peft({os.fspath(path)!r})"
    original, (params, flattened) = params, flatten(params, layouts or {})
    layouts = {p: v for p, v in (layouts or {}).items() if p not in flattened and not v.error}
    config = _config_from_peft(fields, where)
    fan_in_fan_out = bool(fields.get("fan_in_fan_out", False))
    index = _index(params, stacks, path_map, model_type)

    factors: dict[str, dict[str, np.ndarray]] = {}
    expert_factors: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    updates: _Updates = {}
    variant = variants.for_config(config)
    shared: Mapping[str, Any] = {k: tensors.pop(k) for k in variant.peft_shared_keys
                                 if k in tensors}
    for key in sorted(tensors):
        parsed = _parse_key(key, config)
        if parsed is None:
            continue
        kind, torch_path, leaf = parsed
        module, depth = parameters.split_nesting(torch_path)
        if kind == "factor" and module in index and not any(
                n in index[module].node for n in _WEIGHT_LEAVES):  # target_parameters
            name = next(v.name for v in variant.leaves if leaf in (v.peft, v.peft_embed))
            expert_factors.setdefault((module, depth), {})[name] = tensors[key]
            continue
        if torch_path not in index:
            close = difflib.get_close_matches(torch_path, list(index), n=3)
            raise ValueError(
                f"load_peft: {key!r} names the module {torch_path!r}, which is not in the params "
                "tree" + (f"; closest: {close}" if close else "") + ". Pass model_type=, stacks= "
                "or path_map= if the model names its modules differently")
        slot = index[torch_path]
        value = tensors[key]
        if kind == "factor":
            factors.setdefault(torch_path, {})[leaf] = value
            continue
        if kind == "base":
            names = [n for n in _WEIGHT_LEAVES if n in slot.node]
            base = np.asarray(slot.leaf(names[0])) if names else None
            if base is not None and names == ["kernel"] and not fan_in_fan_out:
                base = base.T
            if base is None or base.shape != value.shape or not np.allclose(
                    base, value, rtol=1e-5, atol=1e-6):
                raise ValueError(f"{where}: {key!r} is a base weight saved with the adapter "
                                 f"(peft's save_embedding_layers) that differs from "
                                 f"{slot.flax_path!r} in the params tree (a resized vocabulary?)")
            continue
        if kind == "bias" and config.bias == "none":
            raise ValueError(f"{where}: {key!r} is a bias but the adapter's bias is 'none'")
        names = (["bias"] if leaf == "bias" else [leaf] if _raw_leaf(leaf, slot.node) else
                 [n for n in _WEIGHT_LEAVES if n in slot.node] if leaf == "weight" else [])
        if not names or names[0] not in slot.node:
            raise ValueError(f"{where}: {key!r} has no matching leaf in {slot.flax_path!r} "
                             f"(leaves: {sorted(_leaves(slot.node))})")
        name = names[0]
        if name == "kernel" and not fan_in_fan_out:
            value = value.T
        base = slot.leaf(name)
        if tuple(value.shape) != tuple(base.shape):
            raise ValueError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)}, but "
                             f"{slot.flax_path}.{name} is {tuple(base.shape)} per layer")
        at = updates.setdefault(slot.flax_path, {}).setdefault(slot.layer, {})
        if name in at and not np.array_equal(at[name], value):
            raise ValueError(f"{where}: {key!r} disagrees with another copy of the same tensor")
        at[name] = value

    experts = _expert_updates(expert_factors, index, config, model_type, where)
    tree, torch_layouts = _shape_tree(index)
    modules = config.replace(target_parameters=None) if config.target_parameters else config
    expected = _selected(modules, tree, torch_layouts) if config.target_modules else set()
    quirky = _selected(modules, tree, torch_layouts, peft_quirks=True)
    if quirky is not None and quirky != expected and set(factors) == quirky:
        # peft's code lets a module named in full skip layers_to_transform (its docs say the
        # filter applies); the file follows peft's code: load what it holds.
        warnings.warn(
            f"{where}: target_modules names modules in full that layers_to_transform leaves out "
            f"({sorted(quirky - (expected or set()))[:5]}); peft adapts them anyway (against its "
            "docs) and so does this file: loading them, the returned config names the adapted "
            "modules explicitly", stacklevel=2)
        expected = quirky
    if expected is None:
        raise ValueError(f"{where}: target_modules={config.target_modules!r} matches no module "
                         f"of the params tree (PyTorch paths: {sorted(tree)[:5]}...)")
    if expected:
        shared = variant.peft_shared_read(shared, [
            (index[p].leaf(_weight_name(index[p].node)), _torch_layout(index[p], layouts))
            for p in sorted(expected)], config)
    for torch_path in sorted(expected | set(factors)):
        slot, found = index[torch_path], factors.get(torch_path, {})
        name = _weight_name(slot.node)
        leaves = {suffix: leaf for leaf in variant.leaves
                  if (suffix := leaf.peft_suffix(name))}
        keys = {suffix: PREFIX + torch_path + suffix for suffix in leaves}
        first = next(iter(keys.values()))
        if torch_path not in expected:
            raise ValueError(f"{where}: {first!r} adapts {torch_path!r}, which the adapter's "
                             f"target_modules={config.target_modules!r} does not select")
        for suffix, key in keys.items():
            if suffix not in found and not leaves[suffix].optional:
                raise ValueError(f"{where}: missing key {key!r} (the config targets "
                                 f"{torch_path!r})")
        weight = slot.leaf(name)
        if weight.ndim != 2:
            raise ValueError(f"{where}: {first!r}: {slot.flax_path!r} has a weight of shape "
                             f"{tuple(weight.shape)}; peft interop supports nn.Dense and nn.Embed")
        layout = _torch_layout(slot, layouts)
        arrays = variant.from_peft({leaf.name: found[s].T for s, leaf in leaves.items()
                                    if s in found}, shared, weight.shape, layout)
        fits = all(arrays[leaf.name].ndim == len(leaf.axes) for leaf in variant.leaves
                   if leaf.name in arrays)
        rank = _rank(variant, arrays, config, torch_path) if fits else config.rank(torch_path)
        shapes = variant.shapes(weight.shape, layout, rank, config)
        if not fits or set(arrays) != set(shapes) or any(
                arrays[n].shape != shapes[n] for n in arrays):
            _, (fan_in,), (fan_out,) = layout.split(weight.shape)
            dims = {"i": str(fan_in), "o": str(fan_out), "r": "r"}
            wanted = [("[" + ", ".join(dims[c] for c in leaf.axes[::-1]) + "]") if
                      "_" not in leaf.axes else f"{keys[s]} {tuple(shapes[leaf.name][::-1])}"
                      for s, leaf in leaves.items() if leaf.name in shapes]
            raise ValueError(
                f"{where}: " + " and ".join(f"{keys[s]!r} {tuple(found[s].shape)}" for s in keys
                                     if s in found)
                + f" do not fit {slot.flax_path!r} of shape {tuple(weight.shape)} (expected "
                + " and ".join(wanted)
                + ("" if layouts else "; pass layouts=lora_jax.layouts(model, ...) if its kernel "
                   "is not [in, out]") + ")"
            )
        if rank != config.rank(torch_path):
            raise ValueError(f"{where}: {first!r} has rank {rank}, but the config gives "
                             f"{torch_path!r} r={config.rank(torch_path)}")
        updates.setdefault(slot.flax_path, {}).setdefault(slot.layer, {}).update(
            {variant.names(name)[n]: v for n, v in arrays.items()}, _torch_path=torch_path)
    for slot in index.values():
        if owned(slot.node):
            raise ValueError(f"{where}: {slot.flax_path!r} already has LoRA factors; load onto "
                             "the base params (or merge first)")
    _warn_unused(model_type, list(factors), where, index, config.modules_to_save)
    # A lora_jax.models architecture (model_type) stores its kernels [in, out]: not assumed.
    new_params, adapted = _build(params, index, updates, config, dtype, where, layouts,
                                 assumed=model_type is None)
    new_params = with_leaves(new_params, _expert_leaves(experts, config, dtype, layouts))
    # Flax-side layouts (scanned modules have one stacked axis) for matching on Flax paths.
    flax_layouts = {s.flax_path: _plain_layout(
                        _weight_name(s.node), stacked=int(s.layer is not None),
                        n_in=max(s.leaf(_weight_name(s.node)).ndim - 1, 1))
                    for s in index.values() if "kernel" in s.node or "embedding" in s.node}
    result = _agreeing(config, new_params, flax_layouts, adapted)
    saved = _saved_modules(config.modules_to_save, {s.flax_path: p for p, s in index.items()})
    if tuple(saved or ()) != tuple(config.modules_to_save or ()):
        result = result.replace(modules_to_save=saved)
    return keep_originals(unflatten(new_params, original, flattened), result, base=original), \
        result


_Experts = dict[tuple[str, str], dict[int | None, tuple[np.ndarray, np.ndarray, float]]]


def _expert_updates(found: Mapping[tuple[str, int], Mapping[str, np.ndarray]],
                    index: Mapping[str, _Slot], config: AdapterConfig, model_type: str | None,
                    where: str) -> _Experts:
    """{(Flax path, weight): {layer: (A [E, in, r], B [E, r, out], scale)}} of the file's
    target_parameters factors, checked against the weights the config targets."""
    wanted: dict[tuple[str, int], tuple[_Slot, str]] = {}
    for torch_path, slot in index.items():
        weights = [n for n, v in _leaves(slot.node).items()
                   if n not in owned(slot.node) and np.ndim(v) - (slot.layer is not None) == 3]
        # peft's rule: `<module>.<param>` equal to a name or ending in "." + name.
        named = [w for w in weights
                 if matches(list(config.target_parameters or ()), f"{torch_path}.{w}")]
        for depth, weight in enumerate(reversed(_order(model_type, torch_path, named))):
            wanted[(torch_path, depth)] = (slot, weight)
    out: _Experts = {}
    for (torch_path, depth), (slot, weight) in sorted(wanted.items()):
        key = PREFIX + torch_path + parameters.NEST * depth
        factors = found.get((torch_path, depth), {})
        if set(factors) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: target_parameters names {torch_path}.{weight}, but the "
                             f"file lacks {key}.lora_A.weight / lora_B.weight")
        w = slot.leaf(weight)  # [E, out, in]
        a, b = parameters.from_peft(factors["lora_A"], factors["lora_B"], w.shape[0])
        r = config.rank(f"{torch_path}.{weight}")
        if a.shape != (w.shape[0], w.shape[2], r) or b.shape != (w.shape[0], r, w.shape[1]):
            raise ValueError(f"{where}: {key}.lora_A.weight {factors['lora_A'].shape} and "
                             f"lora_B.weight {factors['lora_B'].shape} do not fit "
                             f"{slot.flax_path}.{weight} {tuple(w.shape)} with r={r} (expected "
                             f"[{r * w.shape[0]}, {w.shape[2]}] and [{w.shape[1]}, "
                             f"{r * w.shape[0]}])")
        scale = config.scaling(f"{torch_path}.{weight}", rank=r)
        out.setdefault((slot.flax_path, weight), {})[slot.layer] = (a, b, scale)
    extra = sorted(set(found) - set(wanted))
    if extra:
        module, depth = extra[0]
        raise ValueError(f"{where}: factors for {module}{parameters.NEST * depth}, "
                         "which the adapter's target_parameters="
                         f"{config.target_parameters!r} does not name")
    return out


def _expert_leaves(experts: _Experts, config: AdapterConfig, dtype: jnp.dtype,
                   layouts: Mapping[str, Layout] | None) -> dict[str, dict[str, Any]]:
    """The factors and record of each expert weight (a scanned stack's layers stacked)."""
    leaves: dict[str, dict[str, Any]] = {}
    for (flax_path, weight), layers in experts.items():
        scanned = None not in layers
        if scanned:
            ordered = [layers[i] for i in sorted(i for i in layers if i is not None)]
            a, b = np.stack([f[0] for f in ordered]), np.stack([f[1] for f in ordered])
        else:
            a, b, _ = layers[None]
        scales = {scale for _, _, scale in layers.values()}
        if len(scales) > 1:
            raise ValueError(f"{flax_path}.{weight}: the layers of a scanned stack need one "
                             f"scale for their experts, got {sorted(scales)}")
        layout = (layouts or {}).get(f"{flax_path}.{weight}") or Layout(
            "dense", stacked=int(scanned), order=parameters.EXPERTS)
        names = variants.for_config(config).names(weight)
        leaves.setdefault(flax_path, {}).update({
            names["lora_A"]: jnp.asarray(a, dtype), names["lora_B"]: jnp.asarray(b, dtype),
            **new_record(weight, layout, Values(a.shape[-1], scales.pop()), config, None,
                         ("lora_A", "lora_B"))})
    return leaves


def _torch_layout(slot: _Slot, layouts: Mapping[str, Layout] | None) -> Layout:
    """The layout of one layer's weight in the slot: its (in, out) as the layout reads it (a
    FlaxConv1D kernel is [out, in])."""
    layout = (layouts or {}).get(slot.flax_path) or _plain_layout(_weight_name(slot.node))
    return dataclasses.replace(layout, stacked=0)


def _rank(variant: variants.Variant, arrays: Mapping[str, Any], config: AdapterConfig,
          torch_path: str) -> int:
    """The rank of one module's arrays (one layer's), or the config's where they carry none
    (LoKr's full factors)."""
    rank = variant.rank_of(arrays, 0)
    return config.rank(torch_path) if rank is None else rank


def _weight_name(node: Mapping[str, Any]) -> str:
    return "embedding" if "embedding" in node else "kernel"


def _plain_layout(weight: str, **fields: Any) -> Layout:
    """The layout of a `kernel` (dense) or `embedding` (embed) read without `layouts`."""
    return Layout("embed" if weight == "embedding" else "dense", **fields)


# {Flax path: {layer (None: unscanned): {leaf name: array, "_torch_path": its PyTorch path}}}
_Updates = dict[str, dict[int | None, dict[str, Any]]]


def _build(params: Mapping[str, Any], index: Mapping[str, _Slot], updates: _Updates,
           config: AdapterConfig, dtype: jnp.dtype, where: str,
           layouts: Mapping[str, Layout] | None, assumed: bool
           ) -> tuple[dict[str, Any], dict[str, tuple[int, float] | None]]:
    """The new tree (per-layer updates stacked for scanned modules) and {flax path: (r, alpha)}."""
    nodes = {s.flax_path: s.node for s in index.values()}
    new_leaves: dict[str, dict[str, Any]] = {}
    adapted: dict[str, tuple[int, float] | None] = {}
    variant = variants.for_config(config)
    for flax_path, layers in updates.items():
        node = nodes[flax_path]
        weight = _weight_name(node)
        mine = {leaf.key(weight): leaf for leaf in variant.leaves}
        # (rank, alpha) of each adapted layer, by peft's rules on its PyTorch path.
        values = {i: (_rank(variant, {mine[k].name: a for k, a in v.items() if k in mine},
                            config, v["_torch_path"]), config.alpha_of(v["_torch_path"]))
                  for i, v in layers.items() if "_torch_path" in v}
        rank = max((r for r, _ in values.values()), default=0)
        n_layers = next(iter(_leaves(node).values())).shape[0]  # scanned (GGML leaves: no len)
        out = {}
        if values:
            adapted[flax_path] = next(iter(values.values()))
            scanned = None not in layers
            # A scanned stack's layers may differ: ranks padded, scales as data.
            found = per_layer({i: (r, scaling(alpha, r, config.use_rslora))
                               for i, (r, alpha) in values.items()}, n_layers if scanned else 0)
            if found.ranks or found.scales:
                adapted[flax_path] = None  # no one (rank, alpha): the file's patterns give them
            layout = (layouts or {}).get(flax_path) or _plain_layout(
                weight, stacked=int(scanned), assumed=assumed and weight != "embedding")
            adapted_layers = tuple(sorted(i for i in values if i is not None)) if scanned else None
            if scanned and len(values) < n_layers:
                variant.check("layer_selection", f"{where}: {flax_path!r}")
            out.update(new_record(weight, layout, found, config, adapted_layers
                                  if adapted_layers and len(adapted_layers) < n_layers else None,
                                  {mine[k].name for v in layers.values() for k in v if k in mine}))
        for name in {k for v in layers.values() for k in v if k != "_torch_path"}:
            leaf = mine.get(name)
            target = dtype if leaf else node[name].dtype
            if None in layers:
                out[name] = jnp.asarray(layers[None][name], target)
                continue
            # A scanned module: layers absent from the file keep their base leaf, or get zero
            # arrays (layers outside layers_to_transform; a fixed point of training).
            resize = leaf.resize if leaf else lambda v, *_: v
            shape = resize(next(v[name] for v in layers.values() if name in v), 0, rank).shape
            out[name] = jnp.asarray(np.stack([
                resize(layers[i][name], 0, rank) if name in layers.get(i, {})
                else (np.zeros(shape) if leaf else np.asarray(node[name][i]))
                for i in range(n_layers)]), target)
        new_leaves[flax_path] = out
    return with_leaves(params, new_leaves), adapted
