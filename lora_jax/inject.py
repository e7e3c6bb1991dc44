"""`inject`: add LoRA factors beside every targeted kernel of a params tree."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.factors import (
    EMBED_FACTORS,
    FACTOR_LEAVES,
    KERNEL_FACTORS,
    Layout,
    init_factors,
    max_rank,
)
from lora_jax.targets import iter_modules, layer_index, matches, path_forms, with_leaves

# "all-linear" skips the output head, as peft does.
_OUTPUT_HEADS = ("lm_head",)


def default_layout(path: str, module: Mapping[str, Any]) -> Layout | None:
    """The layout readable from the tree alone: 2-D kernels are Dense, tables are Embed."""
    if "embedding" in module:
        return Layout("embed", stacked=module["embedding"].ndim - 2)
    if module["kernel"].ndim == 2:
        return Layout("dense")
    return None


def _resolve_layout(path: str, module: Mapping[str, Any], layouts: Mapping[str, Layout] | None
                    ) -> Layout:
    if layouts and path in layouts:
        return layouts[path]
    layout = default_layout(path, module)
    if layout is None:
        raise ValueError(
            f"the kernel at {path!r} has shape {tuple(module['kernel'].shape)}: lora_jax cannot "
            "tell its stacked (scanned), input and output axes from the tree alone. Pass "
            "layouts=lora_jax.layouts(model, *example_inputs), or layouts={path: Layout(...)}"
        )
    return layout


def _is_target(config: LoraConfig, path: str, module: Mapping[str, Any],
               layouts: Mapping[str, Layout] | None) -> bool:
    spec = config.target_modules
    if spec == "all-linear":
        if matches(_OUTPUT_HEADS + tuple(config.modules_to_save or ()), path):
            return False
        found = "kernel" in module and _resolve_layout(path, module, layouts).kind in (
            "dense", "einsum")
    else:
        found = matches(spec, path)
    if found and config.exclude_modules is not None:
        found = not matches(config.exclude_modules, path)
    return found


def _selected_layers(config: LoraConfig, path: str, layout: Layout) -> tuple[int, ...] | bool:
    """True (all layers), False (skip the module), or the stacked-axis indices to adapt."""
    wanted = config.layers_to_transform
    if wanted is None:
        return True
    wanted = (wanted,) if isinstance(wanted, int) else tuple(wanted)
    index = layer_index(path, config.layers_pattern)
    if index is not None:
        return index in wanted
    if layout.stacked:
        return wanted
    return False  # peft skips modules with no layer index when layers_to_transform is set


def _no_match_error(config: LoraConfig, paths: list[str]) -> ValueError:
    spec = config.target_modules
    names = sorted({form.rsplit(".", 1)[-1] for p in paths for form in path_forms(p)} - {""})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    close = {c for w in wanted for c in difflib.get_close_matches(w, names + paths, n=3,
                                                                  cutoff=0.5)}
    # Names sharing a "_"-separated word also count: "q_proj" suggests "q".
    close |= {n for w in wanted for n in names if set(n.split("_")) & set(w.split("_"))}
    close = sorted(close)
    return ValueError(
        f"target_modules={spec!r} matched no module. Modules with weights: {paths[:40]}"
        + (" ..." if len(paths) > 40 else "")
        + (f". Closest names: {close}" if close else "")
    )


def find_targets(
    params: Mapping[str, Any],
    config: LoraConfig,
    layouts: Mapping[str, Layout] | None = None,
) -> dict[str, tuple[Layout, tuple[int, ...] | bool]]:
    """{path: (layout, selected layers)} of the modules `config` adapts; raises if none."""
    if config.target_modules is None:
        raise ValueError(
            "LoraConfig.target_modules is None: name the modules to adapt, e.g. ['q_proj', "
            "'v_proj'], a regex, or 'all-linear'"
        )
    modules = list(iter_modules(params))
    matched = {}
    for path, module in modules:
        if _is_target(config, path, module, layouts):
            matched[path] = (module, _resolve_layout(path, module, layouts))
    if not matched:
        raise _no_match_error(config, [p for p, _ in modules])
    if config.layers_to_transform is not None:
        _check_layer_selection(config, matched)
    targets = {}
    for path, (_, layout) in matched.items():
        selected = _selected_layers(config, path, layout)
        if selected is not False:
            targets[path] = (layout, selected)
    if config.modules_to_save and not any(matches(config.modules_to_save, p) for p, _ in modules):
        raise ValueError(
            f"modules_to_save={list(config.modules_to_save)} matched no module; modules with "
            f"weights: {[p for p, _ in modules][:40]}"
        )
    return targets


def _check_layer_selection(config: LoraConfig,
                           matched: Mapping[str, tuple[Mapping[str, Any], Layout]]) -> None:
    """Every index in layers_to_transform must exist among the targeted modules' layers."""
    wanted = config.layers_to_transform
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    available: set[int] = set()
    for path, (module, layout) in matched.items():
        index = layer_index(path, config.layers_pattern)
        if index is not None:
            available.add(index)
        elif layout.stacked:
            weight = module["embedding" if layout.kind == "embed" else "kernel"]
            available.update(range(weight.shape[0]))
            if config.bias == "lora_only":
                raise ValueError(
                    f"bias='lora_only' with layers_to_transform on the scanned stack {path!r} "
                    "would train the biases of every layer (a stacked bias is one leaf); use "
                    "bias='none' or 'all', or unscanned layers"
                )
    missing = sorted(wanted - available)
    if missing:
        raise ValueError(
            f"layers_to_transform names layers {missing} that the targeted modules do not have; "
            f"their layer indices are {sorted(available)}"
            + ("" if config.layers_pattern is None else
               f" (read after layers_pattern={config.layers_pattern!r})")
        )


def _layer_mask(selected: tuple[int, ...], n_layers: int) -> jax.Array:
    return jnp.zeros(n_layers, bool).at[jnp.asarray(selected)].set(True)


def inject(
    params: Mapping[str, Any],
    config: LoraConfig,
    key: jax.Array,
    *,
    layouts: Mapping[str, Layout] | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> dict[str, Any]:
    """A copy of `params` with LoRA factors beside each targeted kernel or embedding table.

    Dense-like modules get `lora_A` / `lora_B`, Embed gets `lora_embedding_A` / `_B`, stored in
    `dtype` (float32 by default, whatever the base's dtype). 2-D kernels and embedding tables need
    nothing more; a kernel of more axes (a scanned stack, DenseGeneral, Conv, Einsum) needs
    `layouts`, best from `lora_jax.layouts(model, *example_inputs)`. Works under `jax.jit`.

    >>> import flax.linen as nn
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> params = inject(params, LoraConfig(r=2, target_modules=".*"), jax.random.key(1))
    >>> sorted(params), params["lora_A"].shape, params["lora_B"].shape
    (['bias', 'kernel', 'lora_A', 'lora_B'], (3, 2), (2, 4))
    """
    targets = find_targets(params, config, layouts)
    modules = dict(iter_modules(params))
    new_factors: dict[str, dict[str, jax.Array]] = {}
    for index, (path, (layout, selected)) in enumerate(sorted(targets.items())):
        module = modules[path]
        if any(name in module for name in FACTOR_LEAVES):
            raise ValueError(
                f"{path!r} already has LoRA factors; inject once per module (merge first, or "
                "exclude it with exclude_modules)"
            )
        weight = module["embedding" if layout.kind == "embed" else "kernel"]
        r = config.rank(path)
        if r > max_rank(weight.shape, layout):
            raise ValueError(
                f"r={r} for {path!r} is larger than min(fan_in, fan_out)="
                f"{max_rank(weight.shape, layout)} of its weight {tuple(weight.shape)}"
            )
        a, b = init_factors(jax.random.fold_in(key, index), tuple(weight.shape), layout, r,
                            config.init_lora_weights, dtype)
        if isinstance(selected, tuple):
            # Unselected layers of a scanned stack: A = B = 0 keeps them at zero during training.
            mask = _layer_mask(selected, weight.shape[0]).reshape(-1, *([1] * (a.ndim - 1)))
            a, b = jnp.where(mask, a, 0), jnp.where(mask, b, 0)
        names = EMBED_FACTORS if layout.kind == "embed" else KERNEL_FACTORS
        new_factors[path] = dict(zip(names, (a, b), strict=True))
    return with_leaves(params, new_factors)
