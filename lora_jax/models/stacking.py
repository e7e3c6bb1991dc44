"""Layer stacks shared by the reference models: run, stack/unstack, and load from HF names/configs.

A model's per-layer blocks (HF `transformer.h`, `model.layers`, ...) are either separate modules
named `h_0, h_1, ...` or, with `scan_layers=True`, one `nn.scan`-ned module named `h` whose params
carry a leading layer axis. `layer_stack` builds either form and
`run_layers` runs it; `stack_layers` / `unstack_layers`
convert params (or any tree with the same layout, LoRA factors included) between them, and
`load_hf_weights` turns an HF PyTorch state dict into the unscanned tree with clear errors.

    scanned = stack_layers(params, "transformer.h")   # h_0..h_11 -> h with a [12, ...] axis
    params = unstack_layers(scanned, "transformer.h")  # and back
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.record import LoraRecord
from lora_jax.core.targets import hf_module_parts
from lora_jax.quant.quantize import is_quantized

Params = dict[str, Any]
# (dotted Flax path, value) -> the leaf to keep, e.g. quantized (`load_hf_weights`).
Converter = Callable[[str, Any], Any]


# --- running a stack of blocks ------------------------------------------------------------------

def _remat(block_cls: type[nn.Module], remat_policy: str | None, scan: bool) -> type[nn.Module]:
    if remat_policy is None:
        return block_cls
    policy = getattr(jax.checkpoint_policies, remat_policy, None)
    if policy is None or not callable(policy):
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(
            f"unknown remat_policy {remat_policy!r}: use None (no remat) or one of {names}"
        )
    # Under scan, CSE across iterations cannot happen, so prevent_cse only costs performance.
    return nn.remat(block_cls, policy=policy, prevent_cse=not scan)


def layer_stack(
    block_cls: type[nn.Module],
    block_kwargs: Mapping[str, Any],
    n: int,
    *,
    scan: bool,
    remat_policy: str | None,
    num_broadcast: int = 1,
) -> nn.Module | list[nn.Module]:
    """`n` blocks to assign in a parent's `setup`, e.g. `self.h = layer_stack(Block, kw, 12, ...)`.

    Each block is `block_cls(**block_kwargs)` with `__call__(carry, layer_input, *broadcast) ->
    (carry, layer_output)`, taking `num_broadcast` broadcast arguments; run them with
    `run_layers`. `scan=True` gives one `nn.scan`-ned module (named after the attribute, params
    with a leading layer axis); otherwise a list, which Flax names `h_0 ... h_{n-1}`. With a
    `remat_policy` (a name in `jax.checkpoint_policies`) each block is wrapped in `nn.remat`.
    """
    block = _remat(block_cls, remat_policy, scan)
    if not scan:
        return [block(**block_kwargs) for _ in range(n)]
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, *([nn.broadcast] * num_broadcast)),
        out_axes=0,
        length=n,
    )
    return scanned(**block_kwargs)


def run_layers(stack: nn.Module | Sequence[nn.Module], carry: Any, layer_inputs: Any,
               *broadcast: Any) -> tuple[Any, Any]:
    """Run a `layer_stack`: block i gets slice i of `layer_inputs` (a tree with a leading layer
    axis, e.g. a KV cache, or None) and every `broadcast` argument. Returns the final carry and
    the blocks' outputs stacked on a leading axis; scanned and unscanned stacks agree."""
    if isinstance(stack, nn.Module):
        return stack(carry, layer_inputs, *broadcast)
    outputs = []
    for i, block in enumerate(stack):
        layer_input = jax.tree_util.tree_map(lambda a, i=i: a[i], layer_inputs)
        carry, out = block(carry, layer_input, *broadcast)
        outputs.append(out)
    return carry, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs)


# --- converting params between the two layouts ---------------------------------------------------

def _split_path(params: Mapping[str, Any], stack_path: str) -> tuple[list[str], str]:
    *parents, leaf = stack_path.split(".")
    node: Any = params
    for i, part in enumerate(parents):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(
                f"no {'.'.join(parents[: i + 1])!r} in the params tree (looking for the layer "
                f"stack {stack_path!r}); top-level keys: {sorted(params)}"
            )
        node = node[part]
    return parents, leaf


def _replace(params: Mapping[str, Any], parents: Sequence[str],
             fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Params:
    """A copy of `params` whose dict at `parents` is `fn(copy of it)`; the input is not mutated."""
    if not parents:
        return fn(dict(params))
    head, *rest = parents
    out = dict(params)
    out[head] = _replace(params[head], rest, fn)
    return out


def _relayered(tree: Any, by: int) -> Any:
    """`tree` with its adapters' records counting `by` more stacked axes."""
    if isinstance(tree, LoraRecord):
        layout = dataclasses.replace(tree.layout, stacked=tree.layout.stacked + by)
        return dataclasses.replace(tree, layout=layout)
    return {k: _relayered(v, by) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def stack_layers(params: Mapping[str, Any], stack_path: str) -> Params:
    """Unscanned -> scanned: `<stack_path>_0 ... _{n-1}` become `<stack_path>` with a layer axis.

    E.g. SmolLM2's `model.layers_<i>.mlp.up_proj.kernel` [576, 1536] become
    `model.layers.mlp.up_proj.kernel` [30, 576, 1536].
    """
    parents, leaf = _split_path(params, stack_path)
    pattern = re.compile(rf"{re.escape(leaf)}_(\d+)")

    def fn(node: dict[str, Any]) -> dict[str, Any]:
        found = sorted(int(m.group(1)) for k in node if (m := pattern.fullmatch(k)))
        if not found or found != list(range(len(found))):
            raise ValueError(
                f"expected layers {stack_path}_0 ... {stack_path}_<n-1> to stack, found indices "
                f"{found} among keys {sorted(node)}"
            )
        layers = [node.pop(f"{leaf}_{i}") for i in found]
        try:
            node[leaf] = _relayered(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers), 1)
        except ValueError as e:
            raise ValueError(f"the layers of {stack_path!r} differ in structure: {e}") from e
        return node

    return _replace(params, parents, fn)


def unstack_layers(params: Mapping[str, Any], stack_path: str) -> Params:
    """Scanned -> unscanned: `<stack_path>` (leading layer axis) -> `<stack_path>_0 ... _{n-1}`."""
    parents, leaf = _split_path(params, stack_path)

    def fn(node: dict[str, Any]) -> dict[str, Any]:
        if leaf not in node:
            raise ValueError(f"no layer stack {stack_path!r}; keys there: {sorted(node)}")
        stacked = node.pop(leaf)
        sizes = {a.shape[0] for a in jax.tree_util.tree_leaves(stacked)}
        if len(sizes) != 1:
            raise ValueError(f"the leaves of {stack_path!r} have different layer counts {sizes}")
        (n,) = sizes
        for i in range(n):
            layer = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
            node[f"{leaf}_{i}"] = _relayered(layer, -1)
        return node

    return _replace(params, parents, fn)


# --- loading HF PyTorch state dicts ---------------------------------------------------------------

# Flax leaf name -> the HF parameter name of the same tensor.
_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_name(flax_path: str, stacks: Iterable[str]) -> str:
    """The HF PyTorch name of a Flax param path: `transformer.h_0.attn.c_attn.kernel` ->
    `transformer.h.0.attn.c_attn.weight` when `transformer.h` is one of `stacks`."""
    module, _, leaf = flax_path.rpartition(".")
    return ".".join([*hf_module_parts(module, stacks)[0], _HF_LEAF.get(leaf, leaf)])


def load_hf_weights(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    stacks: Sequence[str],
    transpose_kernels: bool = True,
    ignore: str | None = None,
    convert: Converter | None = None,
) -> Params:
    """Build the unscanned params tree shaped like `expected` from an HF state dict.

    `expected` is the abstract params tree (e.g. `jax.eval_shape(model.init, ...)["params"]`).
    Every leaf is read from `hf_name(path, stacks)`; 2-D `kernel`s are transposed from torch's
    [out, in] unless `transpose_kernels=False` (GPT-2's Conv1D). HF names
    matching the regex `ignore` (buffers, a tied head) may be present or absent. `state_dict`
    may read lazily (a Mapping that loads a tensor when asked) and its values may be quantized
    weights (`lora_jax.quant.ggml`); `convert(path, value)` (e.g. `loading.leaf_converter`: a
    cast, then quantization) turns each value as read (numpy, in the file's dtype) into the
    leaf the tree holds (first tried on the abstract leaves, so that its errors come before
    any weight is read); the peak memory is then the result plus one tensor's conversion.
    Raises one ValueError listing every missing, unexpected and misshaped tensor; returns only
    when all tensors loaded, so nothing is ever half-loaded.
    """
    flat = {
        ".".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    if convert is not None:
        jax.eval_shape(lambda leaves: [convert(p, v) for p, v in leaves.items()], flat)
    values: dict[str, Any] = {}
    used: set[str] = set()
    missing, misshaped = [], []
    for path, spec in flat.items():
        name = hf_name(path, stacks)
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        value = state_dict[name]
        quantized = is_quantized(value)
        value = value if quantized else np.asarray(value)
        if path.endswith("kernel") and value.ndim == 2 and transpose_kernels:
            value = value.T
        if tuple(value.shape) != tuple(spec.shape):
            misshaped.append(f"{name}: got {tuple(value.shape)}, "
                             f"expected {tuple(spec.shape)} (as {path})")
        elif not misshaped and not missing:  # else only the errors are wanted
            if convert is not None:  # it casts too: no float32 detour for a bfloat16 load
                # Waiting for each conversion frees its float input before the next is read
                # (dispatch is asynchronous: else many float tensors could be in flight).
                values[path] = jax.block_until_ready(convert(path, value))
            else:
                values[path] = value if quantized else jnp.asarray(value.astype(spec.dtype))
    ignored = re.compile(ignore) if ignore else None
    extra = sorted(k for k in state_dict
                   if k not in used and not (ignored and ignored.fullmatch(k)))
    problems = [f"missing: {missing}" if missing else "",
                f"unexpected: {extra}" if extra else "",
                f"wrong shape: {misshaped}" if misshaped else ""]
    if any(problems):
        raise ValueError("cannot load the HF weights; " + "; ".join(p for p in problems if p))
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(expected), [values[p] for p in flat]
    )


def hf_params(model: nn.Module, state_dict: Mapping[str, Any], stacks: Sequence[str], *,
              scan_layers: bool = False, stack: str | None = None, **load_kwargs: Any) -> Params:
    """The params of a `model` called as `model(input_ids)` from an HF state dict:
    `load_hf_weights` into the shape `model.init` gives, then the layer stack `stack` (default:
    the first of `stacks`) stacked if `scan_layers`."""
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    params = load_hf_weights(state_dict, expected["params"], stacks=stacks, **load_kwargs)
    return stack_layers(params, stack or stacks[0]) if scan_layers else params


def config_from_dict(cls: type, hf_config: Mapping[str, Any],
                     unsupported: Mapping[str, Any] | None = None) -> Any:
    """`cls(**fields)` from the keys of an HF `config.json` dict that are fields of `cls`.

    `unsupported` maps HF options the model does not implement to their only supported value;
    another value is a ValueError (better than silently wrong outputs).
    """
    for name, supported in (unsupported or {}).items():
        if name in hf_config and hf_config[name] is not None and hf_config[name] != supported:
            raise ValueError(
                f"{cls.__module__} does not implement {name}={hf_config[name]!r} "
                f"(only {supported!r})"
            )
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in hf_config.items() if k in fields})
