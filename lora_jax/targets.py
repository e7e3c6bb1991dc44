"""Module paths in a params tree and peft's rules for matching them.

A path is the "."-joined keys of the params tree down to a module, e.g.
`transformer.h_0.attn.c_attn`. Flax names list elements `h_0`; peft names them `h.0`. Every rule
here is tried on both spellings, so peft's target names and layer indices work unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from flax.core import meta

T = TypeVar("T")

_LIST_ELEMENT = re.compile(r"^(.*)_(\d+)$")


def join_path(keys: Sequence[Any]) -> str:
    """The dotted path of a sequence of tree keys (strings or jax key entries)."""
    return ".".join(str(getattr(k, "key", k)) for k in keys)


def path_forms(path: str) -> tuple[str, ...]:
    """The path as written and with Flax list names `h_0` read as peft's `h.0`."""
    peft_form = ".".join(_LIST_ELEMENT.sub(r"\1.\2", part) for part in path.split("."))
    return (path,) if peft_form == path else (path, peft_form)


def matches(spec: str | Sequence[str], path: str) -> bool:
    """peft's rule: a str is `re.fullmatch`ed; a list matches equal names or "." + name suffixes."""
    forms = path_forms(path)
    if isinstance(spec, str):
        return any(re.fullmatch(spec, form) for form in forms)
    return any(form == name or form.endswith("." + name) for form in forms for name in spec)


def layer_index(path: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The layer index in `path` (the number after `layers_pattern`, or after any component)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [r"[^.]+"] if not patterns else [re.escape(p) for p in patterns]
    for form in path_forms(path):
        for name in regexes:
            found = re.match(rf"(?:.*\.)?{name}\.(\d+)\.", form + ".")
            if found:
                return int(found.group(1))
    return None


def pattern_value(patterns: Mapping[str, T], path: str, default: T) -> T:
    """The value of the first regex key matching the end of `path` (peft's rank/alpha_pattern)."""
    for key, value in patterns.items():
        if any(re.match(rf"(?:.*\.)?(?:{key})$", form) for form in path_forms(path)):
            return value
    return default


WEIGHT_LEAVES = ("kernel", "embedding")


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
        m = _LIST_ELEMENT.match(part)
        if m and ".".join([*plain, m[1]]) in stacks:
            out += [m[1], m[2]]
            plain.append(m[1])
            continue
        if ".".join([*plain, part]) in stacks:
            scanned.append(i)
        out.append(part)
        plain.append(part)
    return out, scanned
