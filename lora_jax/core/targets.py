"""Module paths in a params tree (`transformer.h_0.attn.c_attn`) and peft's rules for matching
them, each tried on the Flax spelling of list elements (`h_0`) and peft's (`h.0`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from flax.core import meta

T = TypeVar("T")

# A list element as Flax names it (`h_0`: element 0 of `h`), matched in full; the one grammar.
LIST_ELEMENT = re.compile(r"(.+)_(\d+)")


def join_path(keys: Sequence[Any]) -> str:
    """The dotted path of a sequence of tree keys (strings or jax key entries)."""
    return ".".join(str(getattr(k, "key", k)) for k in keys)


# Flax module paths whose module sits elsewhere in the PyTorch model, {flax path: peft path}:
# registered by architectures that move a module out of a scanned stack (T5's position bias
# table lives in the first block's self-attention). Read by target matching and peft io.
PATH_ALIASES: dict[str, str] = {}


def register_path_alias(flax_path: str, peft_name: str) -> None:
    """Match (and save) the module at `flax_path` under peft's name `peft_name` as well."""
    PATH_ALIASES[flax_path] = peft_name


def peft_path(path: str) -> str:
    """peft's spelling of a Flax path: list elements `h_0` read as `h.0`. The last component is
    kept as written: a module path ends with the module's own name, which may end in a number
    (T5's gated `wi_0`), while list elements hold modules (`h_0.attn`)."""
    parts = path.split(".")
    return ".".join([LIST_ELEMENT.sub(r"\1.\2", part) if LIST_ELEMENT.fullmatch(part) else part
                     for part in parts[:-1]] + parts[-1:])


def path_forms(path: str) -> tuple[str, ...]:
    """The path as written and in peft's spelling (`peft_path`)."""
    peft_form = peft_path(path)
    return (path,) if peft_form == path else (path, peft_form)


def matches_any(spec: str | Sequence[str], paths: Iterable[str]) -> bool:
    """Whether `spec` matches any of the names a module goes by."""
    return any(matches(spec, path) for path in paths)


def saved_name_match(modules_to_save: Sequence[str] | None, path: str) -> bool:
    """peft's rule for which modules `modules_to_save` wraps: the module's name ends with one of
    the given strings (a plain suffix, as peft's `_set_trainable` tests: "norm" names
    `input_layernorm` too)."""
    if not modules_to_save or not path:
        return False
    return any(form.endswith(m) for form in path_forms(path) for m in modules_to_save)


def saved_match(modules_to_save: Sequence[str] | None, path: str) -> bool:
    """peft's rule keeping a module out of LoRA: it is, or lies inside, a module named (a regex
    on whole components) by `modules_to_save`."""
    if not modules_to_save or not path:
        return False
    return any(re.match(rf"(^|.*\.)(?:{m})($|\..*)", form) for form in path_forms(path)
               for m in modules_to_save)


def matches(spec: str | Sequence[str], path: str) -> bool:
    """peft's rule: a str is `re.fullmatch`ed; a list matches equal names or "." + name suffixes."""
    forms = path_forms(path)
    if isinstance(spec, str):
        return any(re.fullmatch(spec, form) for form in forms)
    return any(form == name or form.endswith("." + name) for form in forms for name in spec)


# The attention projections' module names in common architectures, by role: a target that names
# a role in one architecture's spelling is matched to this model's names for it (peft's docs give
# Llama's q_proj / v_proj; BLOOM and GPT-2 fuse q, k and v in one module).
PROJECTION_NAMES = {
    "query": ("q", "q_proj", "query", "wq", "q_lin", "query_proj"),
    "key": ("k", "k_proj", "key", "wk", "k_lin", "key_proj"),
    "value": ("v", "v_proj", "value", "wv", "v_lin", "value_proj"),
    "qkv": ("c_attn", "query_key_value", "qkv", "qkv_proj", "wqkv", "in_proj", "w_pack"),
}


def projection_hint(wanted: Sequence[str], names: Iterable[str]) -> str | None:
    """What to target instead, when `wanted` names attention projections in another
    architecture's spelling than the model's module `names` use; None if it does not.

    >>> projection_hint(["q_proj", "v_proj"], ["dense", "query_key_value"])
    "q_proj, v_proj are query / value projections: this model fuses q, k and v in one module; \
use target_modules=['query_key_value']"
    >>> projection_hint(["query_key_value"], ["c_attn", "c_proj"])
    "query_key_value is a fused q/k/v projection: this model's name is c_attn; use \
target_modules=['c_attn']"
    """
    role_of = {n: role for role, spellings in PROJECTION_NAMES.items() for n in spellings}
    present = {role: sorted(n for n in names if role_of.get(n.lower()) == role)
               for role in PROJECTION_NAMES}
    asked = [w for w in wanted if w.lower() in role_of]
    roles = list(dict.fromkeys(role_of[w.lower()] for w in asked))
    if not roles:
        return None
    fused = bool(present["qkv"]) and any(r != "qkv" and not present[r] for r in roles)
    suggest: list[str] = list(present["qkv"]) if fused else []
    for role in roles:
        parts = ("query", "key", "value") if role == "qkv" and not present["qkv"] else (role,)
        suggest += [n for part in parts for n in present[part] if n not in suggest]
    if not suggest:
        return None
    how = ("this model fuses q, k and v in one module" if fused
           else f"this model's name{'s are' if len(suggest) > 1 else ' is'} "
           f"{', '.join(suggest)}")
    what = " / ".join("fused q/k/v" if r == "qkv" else r for r in roles)
    return (f"{', '.join(asked)} {'are' if len(asked) > 1 else 'is a'} {what} "
            f"projection{'s' if len(asked) > 1 else ''}: {how}; use target_modules={suggest}")


def layer_index(path: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer index in `path`, read as peft reads it from the module name: the first number
    after `layers_pattern` (a regex, or any of a list), or without a pattern the first number
    component that follows a non-leading component (`encoder.block.0.layer.1.x` is block 0; a
    module's own name, `wi_0`, is never an index)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [rf"(?:^|.*?\.){name}\.(\d+)\." for name in patterns] if patterns else [
        r".*?\.[^.]*\.(\d+)\."]
    found = next(filter(None, (re.match(r, peft_path(path)) for r in regexes)), None)
    return int(found.group(1)) if found else None


def stack_root(params: Mapping[str, Any], path: str, n_layers: int) -> str | None:
    """The path of the scanned stack that the module at `path` lies in: the outermost module on
    the path under which every array has `n_layers` as its leading axis (descending through
    modules with a single child, BERT's `encoder` -> `encoder.layer`), or None."""
    parts = path.split(".") if path else []
    node: Any = params
    for depth in range(len(parts) + 1):
        if depth:
            node = node[parts[depth - 1]]
        leaves = [unbox(v) for v in _arrays(node)]
        if leaves and all(getattr(v, "ndim", 0) >= 2 and v.shape[0] == n_layers for v in leaves):
            while depth < len(parts) and len(node) == 1:
                node, depth = node[parts[depth]], depth + 1
            return ".".join(parts[:depth]) if depth else None
    return None


def _arrays(node: Any) -> Iterator[Any]:
    if isinstance(node, Mapping):
        for value in node.values():
            yield from _arrays(value)
    elif hasattr(unbox(node), "shape"):
        yield node


def layer_path(path: str, stack: str, layer: int) -> str:
    """peft's path of one layer of a scanned module: `stack.<layer>` in place of `stack`."""
    rest = path[len(stack):]
    return peft_path(f"{stack}_{layer}{rest}" if rest else f"{stack}_{layer}.x")[
        : None if rest else -2]


def pattern_value(patterns: Mapping[str, T], path: str, default: T) -> T:
    """The value of the first regex key matching the end of `path` (peft's rank/alpha_pattern)."""
    return next((value for key, value in patterns.items()
                 if any(re.match(rf"(.*\.)?({key})$", form) for form in path_forms(path))), default)


WEIGHT_LEAVES = ("kernel", "embedding")


def same_value(a: Any, b: Any) -> bool:
    """Whether two leaves hold the same values (the same object, or equal shapes and values;
    compared on the host, so not under `jit`)."""
    return a is b or (np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b)))


def unbox(tree: Any) -> Any:
    """The tree (or leaf) with Flax metadata boxes (`nn.Partitioned`, `nn.LogicallyPartitioned`)
    replaced by their values."""
    return meta.unbox(tree)


def iter_modules(params: Mapping[str, Any], prefix: tuple[str, ...] = (), *,
                 leaves: Sequence[str] | None = WEIGHT_LEAVES) -> Iterator[
    tuple[str, Mapping[str, Any]]
]:
    """(path, module dict) for every module in the tree that holds one of the array `leaves`
    (default: a `kernel` or `embedding`; None: any array) directly, parents first."""
    names = params if leaves is None else leaves
    if any(name in params and not isinstance(params[name], Mapping) for name in names):
        yield join_path(prefix), params
    for key, value in params.items():
        if isinstance(value, Mapping):
            yield from iter_modules(value, (*prefix, key), leaves=leaves)


def submodules(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, dict) of every module below the root, containers included, parents first."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            path = f"{prefix}.{key}" if prefix else key
            yield path, value
            yield from submodules(value, path)


def with_leaves(params: Mapping[str, Any], additions: Mapping[str, Mapping[str, Any]],
                prefix: str = "") -> dict[str, Any]:
    """A copy of the tree with `additions[path]` merged into the module dict at each path
    (new leaves added, same-named ones replaced); the input is not mutated.

    >>> with_leaves({"dense": {"kernel": 1}}, {"dense": {"lora_A": 2}})
    {'dense': {'kernel': 1, 'lora_A': 2}}
    """
    out = {}
    for key, value in params.items():
        path = f"{prefix}.{key}" if prefix else key
        out[key] = with_leaves(value, additions, path) if isinstance(value, Mapping) else value
    out.update(additions.get(prefix, {}))
    return out


def without_leaves(params: Mapping[str, Any], drop: set[tuple[str, str]],
                   prefix: str = "") -> dict[str, Any]:
    """A copy of the tree without the leaves `(module path, name)` in `drop`.

    >>> without_leaves({"dense": {"kernel": 1, "lora_A": 2}}, {("dense", "lora_A")})
    {'dense': {'kernel': 1}}
    """
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[key] = without_leaves(value, drop, f"{prefix}.{key}" if prefix else key)
        elif (prefix, key) not in drop:
            out[key] = value
    return out


def hf_module_parts(flax_path: str, stacks: Iterable[str]) -> tuple[list[str], list[int]]:
    """The HF PyTorch components of a Flax module path, and the positions of the components
    that name a scanned stack (a name in `stacks` without an index).

    A list element `h_0` of a stack becomes `h`, `0`; a nested stack is named without indices,
    e.g. `encoder.block.layer` for `encoder.block_0.layer_1`.

    >>> hf_module_parts("transformer.h_0.attn", ["transformer.h"])
    (['transformer', 'h', '0', 'attn'], [])
    >>> hf_module_parts("transformer.h.attn", ["transformer.h"])
    (['transformer', 'h', 'attn'], [1])
    """
    stacks = set(stacks)
    out: list[str] = []
    plain: list[str] = []  # the components without layer indices
    scanned: list[int] = []
    for i, part in enumerate(flax_path.split(".") if flax_path else []):
        m = LIST_ELEMENT.fullmatch(part)
        if m and ".".join([*plain, m[1]]) in stacks:
            out += [m[1], m[2]]
            plain.append(m[1])
            continue
        if ".".join([*plain, part]) in stacks:
            scanned.append(i)
        out.append(part)
        plain.append(part)
    return out, scanned
