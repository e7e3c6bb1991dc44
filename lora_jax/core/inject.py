"""`inject`: add LoRA factors and a record beside every targeted weight of a params tree."""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax import variants
from lora_jax.core.config import AdapterConfig
from lora_jax.core.factors import MATERIALISE, Layout, max_rank
from lora_jax.core.record import LoraRecord, owned, record_name, scale_name, target_path
from lora_jax.core.rules import rule_named
from lora_jax.core.saved import keep_originals
from lora_jax.core.targets import (
    PATH_ALIASES,
    iter_modules,
    layer_index,
    layer_path,
    matches,
    matches_any,
    path_forms,
    peft_path,
    projection_hint,
    saved_match,
    saved_name_match,
    stack_root,
    submodules,
    unbox,
    with_leaves,
)
from lora_jax.variants import inits

# "all-linear" skips the output head, as peft does (a classifier only with task_type SEQ_CLS,
# which puts it in modules_to_save: excluded from LoRA like every module to save).
_HEADS = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class Site:
    """A weight that may be adapted: its module dict, param name and layout."""

    path: str  # of the module dict
    weight: str
    layout: Layout
    shape: tuple[int, ...]


def _default_layout(weight: str, shape: tuple[int, ...], path: str) -> Layout:
    """The layout readable from the tree alone: 2-D kernels are Dense, tables are Embed; any
    other kernel's layout says that it needs `layouts`."""
    if weight == "embedding":
        return Layout("embed", stacked=len(shape) - 2)
    if len(shape) == 2:
        return Layout("dense", assumed=True)
    return Layout("dense", error=(
        f"the kernel at {path!r} has shape {shape}: lora_jax cannot tell its stacked "
        "(scanned), input and output axes from the tree alone. Pass "
        "layouts=lora_jax.layouts(model, *example_inputs), or layouts={path: Layout(...)}"))


def _sites(params: Mapping[str, Any], config: AdapterConfig,
           layouts: Mapping[str, Layout] | None) -> dict[str, Site]:
    """{target path: site} for every weight `config` could name: kernels and tables, the
    weights `layouts` describes, and params named by `target_parameters`."""
    layouts = dict(layouts or {})
    sites: dict[str, Site] = {}
    for path, module in iter_modules(params, leaves=None):
        mine = owned(module)
        for name, value in module.items():
            if isinstance(value, Mapping) or name in mine or getattr(unbox(value), "ndim", 0) < 2:
                continue
            shape = tuple(unbox(value).shape)
            target = target_path(path, name, module)
            layout = layouts.get(target)
            if layout is None or layout.weight not in (None, name):
                layout = _default_layout(name, shape, target) if name in (
                    "kernel", "embedding") else None
            if layout is not None:
                sites[target] = Site(path, name, layout, shape)
            param_path = f"{path}.{name}" if path else name
            if _parameter_rule(layout):
                continue  # its rule adds the low-rank term: target_parameters selects the site
            if config.target_parameters and matches(config.target_parameters, param_path):
                given = layouts.get(param_path) or Layout("dense", order="b" * (len(shape) - 2)
                                                          + "io")
                sites[param_path] = Site(path, name, dataclasses.replace(
                    given, rule=MATERIALISE, weight=name, error=None), shape)
    return sites


def _parameter_rule(layout: Layout | None) -> bool:
    """Whether a layer rule reads the weight as a parameter peft names (`Rule.parameter`)."""
    rule = None if layout is None or layout.error else rule_named(layout.rule)
    return rule is not None and rule.parameter


@dataclasses.dataclass(frozen=True)
class View:
    """One module as peft sees it: the names it goes by (the Flax path; for a layer of a scanned
    stack also peft's per-layer path) and the stacked position it stands for (None if not
    stacked)."""

    names: tuple[str, ...]
    layer: int | None = None


def _views(params: Mapping[str, Any], path: str, site: Site) -> list[View]:
    """The modules a site stands for: itself, or each layer of its scanned stack."""
    if site.layout.stacked == 1 and site.layout.rule != MATERIALISE:
        stack = stack_root(params, site.path, site.shape[0])
        if stack is not None:
            return [View((path, layer_path(path, stack, i)), i) for i in range(site.shape[0])]
    if path in PATH_ALIASES:
        return [View((path, PATH_ALIASES[path]))]
    return [View((path,))]


def _is_target(config: AdapterConfig, view: View, site: Site) -> bool:
    names = view.names
    spec = config.target_modules
    if site.layout.rule != MATERIALISE and any(saved_match(config.modules_to_save, n)
                                               for n in names):
        return False  # peft keeps modules_to_save (and what lies inside them) out of LoRA
    if _parameter_rule(site.layout):  # peft's target_parameters: `<module>.<param>` names
        params = [n if n.endswith("." + site.weight) else f"{n}.{site.weight}" for n in names]
        found = config.target_parameters is not None and any(
            matches(config.target_parameters, p) for p in params)
    elif site.layout.rule == MATERIALISE:
        found = True
    elif spec is None:
        found = False
    elif spec == "all-linear":
        if matches_any(_HEADS, names):
            return False
        error = site.layout.error
        found = site.weight != "embedding" and (error is not None or
                                                site.layout.kind in ("dense", "einsum"))
        if found and error:
            if site.layout.rule is None:
                raise ValueError(error)
            found = False  # all-linear skips layers LoRA cannot apply to
    else:
        found = matches_any(spec, names)
    if found and config.exclude_modules is not None:
        found = not matches_any(config.exclude_modules, names)
    return found


def _wanted_layers(config: AdapterConfig) -> set[int] | None:
    """The layer indices to keep, or None for no filter (peft: None, or an empty list)."""
    layers = config.layers_to_transform
    wanted = {layers} if isinstance(layers, int) else set(layers or ())
    return wanted or None


def _view_index(config: AdapterConfig, view: View) -> int | None:
    index = layer_index(peft_path(view.names[-1]), config.layers_pattern)
    if index is None and view.layer is not None and not config.layers_pattern:
        index = view.layer  # a stack at the root of the tree: its position on the stack axis
    return index


def _layer_selected(config: AdapterConfig, view: View, peft_quirks: bool = False) -> bool:
    """Whether `layers_to_transform` keeps this module (its layer index must be listed, as in
    peft); `peft_quirks`: as peft's code, not its docs, a module named in full skips the filter."""
    wanted = _wanted_layers(config)
    if wanted is None:
        return True
    if peft_quirks and _named_in_full(config.target_modules, view.names):
        return True
    index = _view_index(config, view)
    return index is not None and index in wanted


def _named_in_full(spec: str | Sequence[str] | None, names: Sequence[str]) -> bool:
    """Whether a list target_modules names the module in full (peft then skips the filter)."""
    return spec is not None and not isinstance(spec, str) and any(
        form in spec for n in names for form in path_forms(n))


def _no_match_error(config: AdapterConfig, paths: list[str]) -> ValueError:
    field = "target_modules" if config.target_modules is not None else "target_parameters"
    spec = getattr(config, field)
    names = sorted({form.rsplit(".", 1)[-1] for p in paths for form in path_forms(p)} - {""})
    wanted = [spec] if isinstance(spec, str) else list(spec or ())
    close = {c for w in wanted for c in difflib.get_close_matches(w, names + paths, n=3,
                                                                  cutoff=0.5)}
    # Names sharing a "_"-separated word also count: "q_proj" suggests "q".
    close |= {n for w in wanted for n in names if set(n.split("_")) & set(w.split("_"))}
    hint = projection_hint(wanted, names) if field == "target_modules" else None
    return ValueError(
        f"{field}={spec!r} matched no module"
        + (f". {hint}" if hint else "")
        + f". Module names here: {names}. Modules with weights: {paths[:40]}"
        + (" ..." if len(paths) > 40 else "")
        + (f". Closest names: {sorted(close)}" if close else "")
    )


def find_targets(
    params: Mapping[str, Any],
    config: AdapterConfig,
    layouts: Mapping[str, Layout] | None = None,
    *,
    peft_quirks: bool = False,
) -> dict[str, tuple[Site, tuple[int, ...] | bool]]:
    """{target path: (site, selected layers)} of the weights `config` adapts; raises if none,
    or if a targeted module cannot be adapted (naming it, the reason and what to do).

    A scanned stack's layers are matched one by one under peft's per-layer names
    (`transformer.h.3.attn.c_attn`), so exclude_modules, rank/alpha patterns, per-layer targets
    and layers_to_transform select layers of the stack; the others get zero factors. Layers of
    one stack may get different ranks and scales (`per_layer`)."""
    return {path: (site, selected) for path, (site, selected, _) in
            _find(params, config, layouts, peft_quirks=peft_quirks).items()}


def _find(params: Mapping[str, Any], config: AdapterConfig, layouts: Mapping[str, Layout] | None,
          *, peft_quirks: bool = False
          ) -> dict[str, tuple[Site, tuple[int, ...] | bool, dict[int | None, tuple[int, float]]]]:
    """find_targets with each target's {stacked layer (None unscanned): (rank, scale)}."""
    if config.target_modules is None and not config.target_parameters:
        raise ValueError(
            "LoraConfig.target_modules is None: name the modules to adapt, e.g. ['q_proj', "
            "'v_proj'], a regex, or 'all-linear' (or name params with target_parameters)"
        )
    sites = _sites(params, config, layouts)
    modules = dict(iter_modules(params, leaves=None))
    views = {path: _views(params, path, site) for path, site in sites.items()}
    matched = {path: found for path, site in sites.items()
               if (found := [v for v in views[path] if _is_target(config, v, site)])}
    # A weight targeted both as a module (with a rule) and as a param keeps its rule.
    ruled = {(sites[p].path, sites[p].weight) for p in matched
             if sites[p].layout.rule != MATERIALISE}
    matched = {path: found for path, found in matched.items()
               if sites[path].layout.rule != MATERIALISE
               or (sites[path].path, sites[path].weight) not in ruled}
    if not matched:
        raise _no_match_error(config, [p for p in sites if sites[p].layout.rule != MATERIALISE])
    _check_unsupported(params, config, sites, views)
    for path in matched:
        if error := sites[path].layout.error:
            raise ValueError(f"cannot adapt {path!r}: {error}" if sites[path].layout.rule
                             else error)
    if _wanted_layers(config) is not None:
        _check_layer_selection(config, sites, matched)
    targets = {}
    for path, found in matched.items():
        site = sites[path]
        kept = [v for v in found if _layer_selected(config, v, peft_quirks)]
        if not kept:
            continue
        values = {v.layer: (config.rank(*v.names), config.scaling(*v.names)) for v in kept}
        # Unscanned, or every layer of the stack kept: True; else the kept layers.
        layers = tuple(sorted(v.layer for v in kept if v.layer is not None))
        selected = True if len(layers) < len(kept) or len(layers) == site.shape[0] else layers
        if selected is not True and config.adapted_biases and "bias" in modules[site.path]:
            raise ValueError(
                f"bias={config.bias!r} with only some layers of the scanned stack {path!r} adapted "
                "would train the biases of every layer (a stacked bias is one leaf); use "
                "bias='none' or 'all', or unscanned layers"
            )
        targets[path] = (site, selected, values)
    if not targets:
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform!r} keeps none of the targeted "
            f"modules {sorted(matched)[:20]}"
            + ("" if config.layers_pattern is None else
               f" (layer indices read after layers_pattern={config.layers_pattern!r})"))
    # task_type's heads may be absent (peft wraps the names that exist): only the rest must match.
    asked = [m for m in config.modules_to_save or () if m not in config.task_heads]
    if asked and not any(saved_name_match(asked, p) for p, _ in submodules(params)):
        tied = any(saved_name_match(asked, h) for h in _HEADS)
        raise ValueError(
            f"modules_to_save={asked} matched no module; modules with "
            f"weights: {list(sites)[:40]}" + (
                ". A tied output head (tie_word_embeddings) has no module here (it is "
                "Embed.attend); peft trains an untied copy of it and keeps the embeddings: to "
                "do that, build the model with tie_word_embeddings=False and load the HF "
                "weights again (their lm_head.weight)" if tied else "")
        )
    return targets


def _check_unsupported(params: Mapping[str, Any], config: AdapterConfig,
                       sites: Mapping[str, Site], views: Mapping[str, list[View]]) -> None:
    """peft raises when target_modules names a module that is not a layer LoRA applies to
    (a LayerNorm, a block or another container): so does lora_jax."""
    spec = config.target_modules
    if spec is None or spec == "all-linear":
        return
    known = {site.path for site in sites.values()}
    wanted = _wanted_layers(config)
    stacks = {root: sites[p].shape[0] for p, found in views.items() if found[0].layer is not None
              and (root := stack_root(params, sites[p].path, sites[p].shape[0])) is not None}
    for path, module in submodules(params):
        if path in known or owned(module):
            continue
        names = [path, peft_path(path + ".x")[:-2]]  # a container may be a list element
        for stack, n_layers in stacks.items():
            if path == stack or path.startswith(stack + "."):
                names += [layer_path(path, stack, i) for i in range(n_layers)]
        if any(saved_match(config.modules_to_save, n) for n in names):
            continue
        found = matches_any(spec, names)
        if found and wanted is not None and not _named_in_full(spec, names):
            # peft filters by layer before it looks at the module's type
            found = any(layer_index(n, config.layers_pattern) in wanted for n in names)
        if found and not (config.exclude_modules is not None and
                          matches_any(config.exclude_modules, names)):
            kind = "a container of modules" if any(isinstance(v, Mapping) for v in
                                                   module.values()) else "a layer"
            raise ValueError(
                f"target_modules={spec!r} matches {path!r}, {kind} without a weight LoRA "
                "applies to (keys: " + ", ".join(sorted(module)[:8]) + "); peft raises on it "
                "too: narrow the names or the regex, or exclude it with exclude_modules"
            )


def _check_layer_selection(config: AdapterConfig, sites: Mapping[str, Site],
                           matched: Mapping[str, list[View]]) -> None:
    """Warn when layers_to_transform names layers that no targeted module has (peft adapts the
    ones that exist)."""
    wanted = _wanted_layers(config) or set()
    available = {i for found in matched.values() for v in found
                 if (i := _view_index(config, v)) is not None}
    missing = sorted(wanted - available)
    if missing:
        warnings.warn(
            f"layers_to_transform names layers {missing} that the targeted modules do not have; "
            f"their layer indices are {sorted(available)}"
            + ("" if config.layers_pattern is None else
               f" (read after layers_pattern={config.layers_pattern!r})")
            + "; adapting the layers that exist, as peft does", stacklevel=3)


@dataclasses.dataclass(frozen=True)
class Values:
    """The rank and scale of one adapted weight; per stacked layer when its layers differ:
    `rank` is then the largest (the factors' rank axis), `ranks` each layer's (0 for layers
    left out), and `scales` each layer's scale with `scale` None (the scale is data)."""

    rank: int
    scale: float | None
    ranks: tuple[int, ...] | None = None
    scales: tuple[float, ...] | None = None


def per_layer(values: Mapping[int | None, tuple[int, float]], n_layers: int) -> Values:
    """`Values` from {stacked layer (None unscanned): (rank, scale)} of the adapted layers.

    >>> per_layer({0: (4, 2.0), 1: (2, 2.0)}, 3)
    Values(rank=4, scale=2.0, ranks=(4, 2, 0), scales=None)
    """
    ranks = {r for r, _ in values.values()}
    scales = {s for _, s in values.values()}
    full = [values.get(i, (0, 0.0)) for i in range(n_layers)]
    return Values(max(ranks), scales.pop() if len(scales) == 1 else None,
                  tuple(r for r, _ in full) if len(ranks) > 1 else None,
                  tuple(s for _, s in full) if len(scales) > 1 else None)


def new_record(weight: str, layout: Layout, values: Values, config: Any,
               layers: tuple[int, ...] | None, arrays: Any) -> dict[str, Any]:
    """The record of a weight that `config` adapts with `values` (its rank and scale) and the
    variant's `arrays` (their names), and its array scale when its layers' scales differ: the
    one constructor (inject, load_peft)."""
    variant = variants.for_config(config)
    record = LoraRecord(weight, layout, values.rank, values.scale, config.dropout, layers,
                        variant.name, ranks=values.ranks, form=variant.form(arrays),
                        options=variant.options(config))
    leaves: dict[str, Any] = {record_name(weight): record}
    if values.scale is None:
        leaves[scale_name(weight)] = jnp.asarray(values.scales, jnp.float32)
    return leaves


def _check_variant(path: str, site: Site, variant: variants.Variant, config: Any) -> None:
    """The variant's refusals where it does not apply to this weight, with the reason."""
    layout = site.layout
    where = f"{path!r} ({layout.kind})"
    if layout.kind not in variant.kinds:
        variant.check("kinds", where)
    if layout.rule == MATERIALISE:
        variant.check("materialised", where)
    if "b" in layout.roles(len(site.shape)):
        variant.check("kept_axes", where)
    if config.layers_to_transform is not None and layout.stacked:
        variant.check("layer_selection", where)
    why = variant.refuses(site.shape, layout)
    if why:
        raise ValueError(f"{where}: {variant.name} cannot adapt it: {why}")
    rule = rule_named(layout.rule)
    if variant.recomputes_base and config.dropout and layout.kind != "embed" and \
            rule is not None and rule.base is None:
        raise ValueError(
            f"{variant.name} with lora_dropout on {path!r}: its rule {rule.name!r} has no `base` "
            "to recompute the layer on the dropped input (as peft does); set lora_dropout=0 or "
            "give the rule a base")


def _adapter_leaves(path: str, site: Site, weight: Any, variant: variants.Variant,
                    config: Any, values: Values, key: jax.Array, dtype: jnp.dtype,
                    selected: tuple[int, ...] | bool, shared: Any
                    ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(The new leaves of one adapted weight: the variant's arrays and, for an initialiser that
    changes the base (PiSSA, OLoRA, LoftQ), the new base weight; the arrays' leaf names)."""
    plain = unbox(weight)
    inits.check(path, plain, site.layout, values, config)
    arrays, residual = variant.init(plain, site.layout, config, values, key, dtype, shared)
    if isinstance(selected, tuple):
        # Unselected layers of a scanned stack: zero arrays keep them at zero during training.
        mask = jnp.zeros(site.shape[0], bool).at[jnp.asarray(selected)].set(True)
        select = lambda new, old: jnp.where(mask.reshape(-1, *[1] * (new.ndim - 1)), new, old)
        arrays = {name: select(value, 0) for name, value in arrays.items()}
        residual = None if residual is None else select(residual, plain)
    leaves: dict[str, Any] = {variant.names(site.weight)[n]: v for n, v in arrays.items()}
    if residual is not None:
        leaves[site.weight] = weight.replace_boxed(residual) if hasattr(weight, "replace_boxed") \
            else residual
    return leaves, tuple(arrays)


def inject(
    params: Mapping[str, Any],
    config: AdapterConfig,
    key: jax.Array,
    *,
    layouts: Mapping[str, Layout] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> dict[str, Any]:
    """A copy of `params` with LoRA factors and a `LoraRecord` beside each targeted weight.

    Dense-like modules get `lora_A` / `lora_B` (and the record `lora`), Embed gets
    `lora_embedding_A` / `_B`, another weight `w` gets `w_lora_A` / `w_lora_B`, stored in `dtype`
    whatever the base's. 2-D kernels and tables read as Dense / Embed from the tree alone; other
    layers (a GPT-2 FlaxConv1D kernel is `[out, in]`) need `layouts`, best from
    `lora_jax.layouts(model, *example_inputs)`. Weights named by `config.target_parameters` are
    adapted by materialising W + scale * A B. Works under `jax.jit`.

    >>> import flax.linen as nn
    >>> from lora_jax import LoraConfig
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> params = inject(params, LoraConfig(r=2, target_modules=".*"), jax.random.key(1))
    >>> sorted(params), params["lora_A"].shape, params["lora_B"].shape
    (['bias', 'kernel', 'lora', 'lora_A', 'lora_B'], (3, 2), (2, 4))
    """
    targets = _find(params, config, layouts)
    variant = variants.for_config(config)
    modules = dict(iter_modules(params, leaves=None))
    shared = variant.prepare([(unbox(modules[s.path][s.weight]), s.layout)
                              for s, _, _ in targets.values()], config, key)
    new_leaves: dict[str, dict[str, Any]] = {}
    residuals = []
    for index, (path, (site, selected, by_layer)) in enumerate(sorted(targets.items())):
        module = modules[site.path]
        values = per_layer(by_layer, site.shape[0] if site.layout.stacked else 0)
        if any(n in module for n in (record_name(site.weight),
                                     *variant.names(site.weight).values())):
            raise ValueError(
                f"{path!r} already has LoRA factors; inject once per module (merge first, or "
                "exclude it with exclude_modules)"
            )
        if site.layout.rule == MATERIALISE and config.dropout:
            raise ValueError(
                f"{path!r} is adapted through target_parameters (W + scale * A B), which has no "
                "input to drop out: set lora_dropout=0 or target its module instead"
            )
        _check_variant(path, site, variant, config)
        most = max_rank(site.shape, site.layout)
        if values.rank > most and not inits.changes_base(config.init_lora_weights):
            warnings.warn(f"r={values.rank} for {path!r} is larger than min(fan_in, fan_out)="
                          f"{most} of its weight {site.shape}; the update's rank is at most "
                          "that (peft accepts it too)", stacklevel=2)
        leaves, arrays = _adapter_leaves(path, site, module[site.weight], variant, config,
                                         values, jax.random.fold_in(key, index), dtype,
                                         selected, shared)
        if site.weight in leaves:
            residuals.append(path)
        layers = selected if isinstance(selected, tuple) else None
        leaves.update(new_record(site.weight, site.layout, values, config, layers, arrays))
        new_leaves.setdefault(site.path, {}).update(leaves)
    if residuals and config.init_lora_weights == "loftq":
        warnings.warn(
            f"init_lora_weights='loftq' replaced {len(residuals)} base weights by their quantized "
            "part Q (Q + A B approximates W); the adapter applies to this quantized base",
            stacklevel=2)
    elif residuals:
        warnings.warn(
            f"init_lora_weights={config.init_lora_weights!r} replaced {len(residuals)} base "
            "weights by their residual W - scale * A B (the adapted model starts equal to the "
            "base). Keep the original params: save_peft(..., initial_params=...) converts the "
            "adapter to a plain LoRA of the untouched base", stacklevel=2)
    return keep_originals(with_leaves(params, new_leaves), config)
