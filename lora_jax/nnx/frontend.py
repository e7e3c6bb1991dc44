"""Flax NNX frontend: the same LoRA on `nnx.Module` models (guide: docs/guides/nnx.md).

`inject` runs the core (`lora_jax.inject`) on the model's parameters as a pure dict and puts the
result back on the modules: the factors as `nnx.LoRAParam` variables beside the weight, the
`LoraRecord` as a `LoraRecordVar` (`q.lora`; no arrays), so `nnx.to_pure_dict(nnx.state(model))`
is exactly the tree the core reads. Each adapted module's class becomes a subclass whose call adds
`scale * (dropout(x) @ A) @ B` after the layer's own (its `lora_jax.Rule`, `lora_jax.nnx.rules`).
LoRA dropout draws from a stream forked from `rngs` onto each adapted module (as `nnx.Dropout`
does) and follows `model.train()` / `model.eval()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import lora_jax.nnx.rules  # noqa: F401  (registers the rules for nnx's layers)
from lora_jax import variants
from lora_jax.core import counting
from lora_jax.core.config import AdapterConfig, LoraConfig
from lora_jax.core.factors import Layout
from lora_jax.core.forward import TIED_HEAD_WARNING, Call, check_reading, forward, materialised
from lora_jax.core.inject import find_targets
from lora_jax.core.inject import inject as core_inject
from lora_jax.core.merge import merge as core_merge
from lora_jax.core.partition import trainable_mask
from lora_jax.core.record import LoraRecord, check_config, iter_records, record_name, target_path
from lora_jax.core.rules import Rule, read_layout, rule_for
from lora_jax.core.saved import originals
from lora_jax.core.sharding import lora_specs
from lora_jax.core.targets import iter_modules
from lora_jax.peft import files as peft_io

__all__ = ["LoraRecordVar", "adapt", "count_parameters", "functional", "inject", "layouts",
           "load_peft", "merge", "params", "print_trainable_parameters", "save_peft", "trainable",
           "update"]

_RNGS = "lora_rngs"  # the attribute holding an adapted module's LoRA dropout stream
# Where `layouts`' probe classes record the calls they see ({path: (rule, weight, ndim, args,
# kwargs)}); a context variable, so a nested `layouts` call gets its own.
_PROBE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lora_probe",
                                                                                default=None)


class LoraRecordVar(nnx.Variable):
    """An adapted weight's `LoraRecord` as an NNX variable: no arrays (free under jit), but part
    of the module's state, so the functional side reads it from `to_pure_dict()`."""


def _set(module: nnx.Module, **attributes: Any) -> None:
    """Give a model's module the frontend's own attributes (which mypy does not know of)."""
    for name, value in attributes.items():
        setattr(module, name, value)


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """{dotted path: module} of every module in the graph (a shared module under its first
    path)."""
    return {".".join(str(k) for k in p): node for p, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)}


def params(model: Any) -> dict[str, Any]:
    """The model's parameters and LoRA records as a pure nested dict (what the core reads):
    `state.to_pure_dict()` with `nnx.List` indices as str keys ("0"), so that paths read
    `h.0.attn.q` and `nnx.replace_by_pure_dict` takes the dict back.

    `model` is an `nnx.Module` or an `nnx.State` (e.g. from `nnx.split`). Parameters only: rng
    streams, batch statistics and caches are left out.

    >>> import jax.numpy as jnp
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> model = inject(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    >>> sorted(params(model))  # the record is "lora"
    ['bias', 'kernel', 'lora', 'lora_A', 'lora_B']
    """
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    pure = nnx.to_pure_dict(nnx.filter_state(state, nnx.Any(nnx.Param, LoraRecordVar)))

    def keys_as_str(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {str(k): keys_as_str(v) for k, v in node.items()}
        return node

    return keys_as_str(pure)


# --- how each module reads its weight ----------------------------------------------------------

def _read(rule: Rule, module: nnx.Module, name: str, shape: tuple[int, ...], dtype: Any,
          inner_ndim: int | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Layout:
    """The layout of `module`'s weight `name` (stored `shape`) as its rule reads it."""
    if inner_ndim is None:
        inner_ndim = len(shape)
    stacked = len(shape) - inner_ndim
    if stacked < 0:
        return Layout("dense", rule=rule.name, weight=name, error=(
            f"its weight {name!r} has shape {shape}, fewer axes than the module's "
            f"{inner_ndim}"))
    layout = read_layout(rule, module, name, jax.ShapeDtypeStruct(shape[stacked:], dtype), args,
                         kwargs, stacked=stacked)
    if layout.error:
        return layout
    try:
        layout.roles(len(shape))
    except ValueError as e:
        return dataclasses.replace(layout, error=(
            f"{e} (stored shape {shape}). A stacked (nnx.vmap / nnx.scan) weight of a rule "
            "without NnxRule.weight_ndim: pass layouts=lora_jax.nnx.layouts(model, "
            "*example_inputs)"))
    return layout


def _layouts(modules: Mapping[str, nnx.Module], tree: Mapping[str, Any],
             calls: Mapping[str, tuple[Any, ...]]) -> dict[str, Layout]:
    """{target path: Layout} of the weights in `tree` for `calls` ({module path: (rule, weight
    name, the module's own weight ndim or None, args, kwargs)})."""
    nodes = dict(iter_modules(tree, leaves=None))
    out = {}
    for path, (rule, name, inner, args, kwargs) in calls.items():
        node = nodes.get(path)
        if node is None or name not in node or not hasattr(node[name], "shape"):
            continue
        out[target_path(path, name, node)] = _read(rule, modules[path], name,
                                                   tuple(node[name].shape), node[name].dtype,
                                                   inner, args, kwargs)
    return out


def _static_layouts(model: nnx.Module, tree: Mapping[str, Any],
                    given: Mapping[str, Layout] | None) -> dict[str, Layout]:
    """{target path: Layout} of the modules with a rule, read from their attributes alone,
    updated with the `given` layouts (`lora_jax.nnx.layouts`)."""
    modules = _modules(model)
    calls: dict[str, tuple[Any, ...]] = {}
    for path, module in modules.items():
        rule = rule_for(module)
        if rule is not None:
            ndim = getattr(rule, "weight_ndim", None)  # an NnxRule's
            calls[path] = (rule, rule.weight_name(module), ndim(module) if ndim else None, (), {})
    return {**_layouts(modules, tree, calls), **dict(given or {})}


def layouts(model: nnx.Module, *args: Any, **kwargs: Any) -> dict[str, Layout]:
    """{path: Layout} of every module with a rule, read from one abstract call `model(*args,
    **kwargs)` (no FLOPs): for rules that need the call (an `nnx.Einsum` whose equation is given
    at call time) or that cannot tell a stacked weight's layer axes from the module alone (a
    user's `Rule` without `NnxRule.weight_ndim`). Pass it to `inject(..., layouts=...)`. flax's
    own layers need no example: `inject` reads them from their attributes.
    """
    graphdef, state = nnx.split(model)
    seen: dict[str, tuple[Any, ...]] = {}

    def run(state: nnx.State) -> Any:
        copy = nnx.merge(graphdef, state)
        for path, module in _modules(copy).items():
            rule = rule_for(module)
            if rule is not None and isinstance(getattr(module, rule.weight_name(module), None),
                                               nnx.Variable):
                _set(module, _lora_probe=path)  # static: survives nnx transforms
                module.__class__ = _probe_class(type(module))
        return copy(*args, **kwargs)

    token = _PROBE.set(seen)
    try:
        jax.eval_shape(run, state)
    finally:
        _PROBE.reset(token)
    return _layouts(_modules(model), params(state), seen)


def _probe_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    seen = _PROBE.get()
    path = getattr(self, "_lora_probe", None)
    rule = rule_for(self)
    if seen is not None and path is not None and path not in seen and rule is not None:
        name = rule.weight_name(self)
        seen[path] = (rule, name, getattr(self, name)[...].ndim, args, dict(kwargs))
    return type(self)._lora_probed.__call__(self, *args, **kwargs)


@functools.cache
def _probe_class(base: type) -> type:
    return type(base.__name__, (base,), {"__call__": _probe_call, "__module__": __name__,
                                         "_lora_probed": base})


# --- the adapted forward ------------------------------------------------------------------------

def _records(module: nnx.Module) -> list[LoraRecord]:
    return [v.get_value() for v in vars(module).values() if isinstance(v, LoraRecordVar)]


def _where(module: nnx.Module) -> str:
    return f"{getattr(module, '_lora_path', '?')!r} ({type(module).__mro__[1].__name__})"


@contextlib.contextmanager
def _materialised(module: nnx.Module, records: list[LoraRecord]) -> Iterator[None]:
    """The weights of `records` replaced by W + scale * A B for the duration of one call."""
    saved = []
    try:
        for record in records:
            var = getattr(module, record.weight)
            weight = var[...]
            leaves, scale = record.read(lambda name: getattr(module, name)[...])
            # Inside a vmap / scan the stacked axes are sliced off: as many as a leaf without
            # output axes (LoRA's A) lost.
            layout = record.layout
            leaf = next(leaf for leaf in variants.of(record).leaves if "o" not in leaf.axes)
            own = (layout.order or "").count("b") + sum(layout.n_in if c == "i" else 1
                                                        for c in leaf.axes)
            layout = dataclasses.replace(layout, stacked=leaves[leaf.name].ndim - own)
            var.set_value(materialised(f"{getattr(module, '_lora_path', '?')}.{record.weight}",
                                       record, weight, leaves, scale, layout, stacklevel=4))
            saved.append((var, weight))
        yield
    finally:
        for var, weight in reversed(saved):
            var.set_value(weight)


def _adapted_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    records = _records(self)
    with _materialised(self, [r for r in records if r.materialised]):
        out = type(self)._lora_base.__call__(self, *args, **kwargs)
    rule = rule_for(self)
    for record in records:
        if not record.materialised:
            if rule is None:
                raise ValueError(f"{_where(self)}: no registered Rule reads this module: register "
                                 "its class's Rule (lora_jax.register_rule) before calling it")
            bias = getattr(self, "bias", None)
            stream = getattr(self, _RNGS, None)
            rng = lambda stream=stream: None if stream is None or getattr(
                self, "deterministic", False) else stream()
            call = Call(rule, self, args, kwargs, out, getattr(self, record.weight)[...],
                        None if bias is None else bias[...], record, rng, _where(self))
            check_reading(call, "lora_jax.nnx.layouts")
            out = forward(call, *record.read(lambda name: getattr(self, name)[...]))
    return out


def _adapted_attend(self: Any, *args: Any, **kwargs: Any) -> Any:
    if any(not r.materialised for r in _records(self)):
        warnings.warn(TIED_HEAD_WARNING.format(path=getattr(self, "_lora_path", "?"),
                                               how="Embed.attend"),
                      stacklevel=2)
    return type(self)._lora_base.attend(self, *args, **kwargs)


@functools.cache
def _adapted_class(base: type) -> type:
    """The subclass of `base` whose call adds the LoRA deltas (one per base class)."""
    if "_lora_base" in vars(base):
        return base
    namespace = {"__call__": _adapted_call, "__module__": __name__, "_lora_base": base,
                 "__doc__": f"{base.__qualname__} with LoRA deltas added to its output."}
    if hasattr(base, "attend"):
        namespace["attend"] = _adapted_attend
    return type(f"{base.__name__}WithLoRA", (base,), namespace)


# --- inject / adapt / merge ---------------------------------------------------------------------

def _keys(rngs: nnx.Rngs | jax.Array | int, config: LoraConfig) -> tuple[jax.Array, Any]:
    """(init key, dropout stream, or None when the adapter draws no dropout keys: neither
    lora_dropout nor its variant's own options, e.g. LoKr's rank dropout)."""
    draws = config.dropout or variants.for_config(config).options(config)
    if isinstance(rngs, nnx.Rngs):
        return rngs.params(), rngs.dropout if draws else None  # (`dropout`, else `default`)
    key = jax.random.key(rngs) if isinstance(rngs, int) else rngs
    return key, nnx.RngStream(jax.random.fold_in(key, 1 << 30), tag="dropout") if draws else None


def inject(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs | jax.Array | int, *,
           layouts: Mapping[str, Layout] | None = None,
           dtype: jnp.dtype = jnp.float32) -> nnx.Module:
    """Add LoRA factors to the modules of `model` that `config` targets, in place (NNX style);
    returns `model`.

    Targets, paths, ranks, scales, init and errors are the core's (`lora_jax.inject`) on the
    model's parameter dict: paths are the nnx state's keys joined by "." (`h.0.attn.q` for an
    `nnx.List`; `h.attn.q` for an `nnx.vmap` / `nnx.scan` stack, whose layers are the leading
    axis that `layers_to_transform` selects on). `rngs` (an `nnx.Rngs`, a key or an int seed)
    gives the init key (its `params` stream) and, with `lora_dropout`, the dropout stream
    (`dropout`, else `default`). flax's Linear, LinearGeneral, Conv, Embed and Einsum are read
    from their attributes; `layouts` (`lora_jax.nnx.layouts(model, x)`) is needed only for
    rules that must see a call.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> model = inject(model, LoraConfig(r=2, target_modules=".*"), nnx.Rngs(1))
    >>> model.lora_A.shape, model.lora_B.shape, type(model).__name__
    ((3, 2), (2, 4), 'LinearWithLoRA')
    >>> model(jnp.ones((1, 3))).shape
    (1, 4)
    """
    tree = params(model)
    found = _static_layouts(model, tree, layouts)
    key, stream = _keys(rngs, config)
    _check_rules(model, config, tree, found)
    adapted = core_inject(tree, config, key, layouts=found, dtype=dtype)
    return adapt(model, adapted, stream)


def _check_rules(model: nnx.Module, config: LoraConfig, tree: Mapping[str, Any],
                 found: Mapping[str, Layout]) -> None:
    """Refuse, before any work, targets of modules the NNX frontend cannot call with LoRA."""
    modules = _modules(model)
    for path, (site, _) in find_targets(tree, config, found).items():
        module = modules.get(site.path)
        if module is None:
            raise ValueError(f"{path!r}: no NNX module owns this weight")
        if site.layout.rule is None:
            raise ValueError(
                f"{path!r} is a {type(module).__name__}, which has no layer rule, so LoRA "
                "cannot be added to its output: register a Rule for its class "
                "(lora_jax.register_rule), target its weight with LoraConfig("
                f"target_parameters=['{site.path + '.' if site.path else ''}{site.weight}']) to "
                "add W + scale * A B, or exclude it"
            )


def adapt(model: nnx.Module, tree: Mapping[str, Any], rngs: nnx.Rngs | Any = None) -> nnx.Module:
    """Put the adapters of a parameter dict onto `model`, in place; returns `model`.

    `tree` is `model`'s `params` with factors and records beside the adapted weights, e.g. from
    `lora_jax.inject` or `lora_jax.load_peft` on `params(model)`. Any other leaf that differs
    from the model's (PiSSA's residual weight, a bias or module trained with the adapter)
    replaces it. `rngs` gives LoRA dropout its stream.
    """
    return _adapt(model, tree, rngs, {})


def _adapt(model: nnx.Module, tree: Mapping[str, Any], rngs: Any,
           rename: Mapping[str, str]) -> nnx.Module:
    """`adapt`, with `rename` mapping the tree's module paths to the model's."""
    modules = _modules(model)
    stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
    owners = []
    for item in iter_records(tree):  # check everything before changing anything
        record = item.record
        module = modules.get(rename.get(item.path, item.path))
        if module is None:
            raise ValueError(f"{item.target!r}: the model has no module at {item.path!r}")
        rule = rule_for(module)
        if not record.materialised and (rule is None or rule.weight_name(module) !=
                                        record.weight):
            raise ValueError(
                f"{item.target!r} holds LoRA factors for {record.weight!r}, but its "
                f"{type(module).__name__} has no layer rule for that weight: register a Rule "
                "for its class (lora_jax.register_rule), or adapt it through target_parameters"
            )
        if record.scale is None:
            raise ValueError(
                f"{item.target!r}: the layers of this stack have different scales (rank_pattern "
                "/ alpha_pattern naming its layers), kept as an array beside the factors, which "
                "the NNX frontend does not read yet: give the stack's layers one alpha / rank, or "
                "use unscanned layers (nnx.List)")
        for name in record.leaves:
            if name in vars(module):
                raise ValueError(f"{item.target!r} already has an attribute {name!r}; inject "
                                 "once per module (merge first, or exclude it)")
        owners.append((item, module))
    _replace_changed(modules, tree, rename)
    if originals(tree):
        warnings.warn(
            f"modules_to_save holds the embedding table(s) {sorted(originals(tree))}: the NNX "
            "frontend trains each table in place, so a tied head (Embed.attend) follows it; "
            "peft and lora_jax's linen frontend keep a tied head on the original table",
            stacklevel=3)
    for item, module in owners:
        record = item.record
        weight = getattr(module, record.weight)
        for name, var in _factors(item, weight).items():
            setattr(module, name, var)
        setattr(module, record_name(record.weight), LoraRecordVar(record))
        added = [*getattr(module, "_lora_added", ()), *record.arrays, record_name(record.weight)]
        if record.draws and stream is not None and _RNGS not in vars(module):
            fork = stream.fork()
            shape = item.weight.shape[:record.layout.stacked]
            setattr(module, _RNGS, fork.split(shape) if shape else fork)
            added.append(_RNGS)
            if not hasattr(module, "deterministic"):
                _set(module, deterministic=False)
                added.append("deterministic")
        _set(module, _lora_added=tuple(added), _lora_path=rename.get(item.path, item.path))
        module.__class__ = _adapted_class(type(module))
    return model


def _replace_changed(modules: Mapping[str, nnx.Module], tree: Mapping[str, Any],
                     rename: Mapping[str, str], path: str = "") -> None:
    """Set every existing variable whose value in `tree` is another array."""
    module = modules.get(rename.get(path, path))
    for key, value in tree.items():
        if isinstance(value, Mapping):
            _replace_changed(modules, value, rename, f"{path}.{key}" if path else str(key))
        elif module is not None and value is not None and not isinstance(value, LoraRecord):
            var = vars(module).get(key)
            if isinstance(var, nnx.Variable) and var.get_value() is not value:
                var.set_value(value)


_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def update(model: nnx.Module, tree: Mapping[str, Any]) -> nnx.Module:
    """Set `model`'s variables from a params dict, in place (e.g. the trainable half of
    `lora_jax.split(params(model), config)` after training or from a checkpoint): `None` holes
    and records are skipped, so a partial tree updates only its leaves. Returns `model`.

    >>> import jax.numpy as jnp
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> model = inject(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    >>> update(model, {"lora_B": jnp.ones((2, 4))}).lora_B[...].sum()
    Array(8., dtype=float32)
    """
    _replace_changed(_modules(model), tree, {})
    return model


def _factors(item: Any, weight: nnx.Variable) -> dict[str, nnx.Variable]:
    """The record's arrays as `nnx.LoRAParam` variables if they train, else frozen `nnx.Param`s.
    When the weight has sharding metadata, each carries its spec from the core's `lora_specs`
    (A keeps the weight's input and stacked axes' mesh axes, B its output axes), and is placed
    on the weight's mesh when the weight's value is."""
    record = item.record
    values = {name: item.module[name] for name in record.arrays}
    kinds = {name: nnx.LoRAParam if name in record.trained else nnx.Param for name in values}
    metadata = weight.get_metadata()
    names = next((metadata[k] for k in _SHARDING_KEYS if metadata.get(k) is not None), None)
    if names is None:
        return {name: kinds[name](value) for name, value in values.items()}
    node = {record.weight: item.weight, record_name(record.weight): record, **values}
    specs = lora_specs(node, {record.weight: jax.sharding.PartitionSpec(*names)})
    sharding = getattr(weight.get_value(), "sharding", None)
    out: dict[str, nnx.Variable] = {}
    for name, value in values.items():
        if isinstance(sharding, jax.sharding.NamedSharding):
            value = jax.device_put(value, jax.sharding.NamedSharding(sharding.mesh, specs[name]))
        out[name] = kinds[name](value, out_sharding=tuple(specs[name]), eager_sharding=False)
    return out


def _detach(module: nnx.Module) -> None:
    """Remove what `adapt` added to `module` and restore its class."""
    for name in (*getattr(module, "_lora_added", ()), "_lora_added", "_lora_path"):
        if name in vars(module):
            delattr(module, name)
    base = vars(type(module)).get("_lora_base")
    if base is not None:
        module.__class__ = base


def merge(model: nnx.Module, config: LoraConfig | None = None, *,
          safe: bool = False) -> nnx.Module:
    """A plain copy of `model`: W + scale * A B folded into each adapted weight (the core's
    `lora_jax.merge`: float32, cast once), factors, records and LoRA dropout removed, the
    modules' own classes restored. `model` is left as it is.

    >>> import jax.numpy as jnp
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> model = inject(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    >>> plain, x = merge(model, config), jnp.ones((1, 4))
    >>> type(plain).__name__, sorted(params(plain)), bool(jnp.allclose(plain(x), model(x)))
    ('Linear', ['bias', 'kernel'], True)
    """
    plain = nnx.clone(model)
    tree = params(plain)
    merged = core_merge(tree, config, safe)
    nodes = dict(iter_modules(merged, leaves=None))
    modules = _modules(plain)
    for item in iter_records(tree):
        module = modules[item.path]
        _detach(module)
        getattr(module, item.record.weight).set_value(nodes[item.path][item.record.weight])
    return plain


# --- the functional side ------------------------------------------------------------------------

def trainable(model: nnx.Module, config: LoraConfig) -> Callable[[tuple[Any, ...], Any], bool]:
    """An nnx filter for what `config` trains: the factors, plus biases (`bias="all"` /
    `"lora_only"`) and `modules_to_save`. With plain `bias="none"` and no modules to save it
    selects what `nnx.LoRAParam` selects. For `nnx.Optimizer(model, tx, wrt=...)`,
    `nnx.DiffState(0, ...)` and `nnx.split(model, ..., ...)`.

    >>> import jax.numpy as jnp
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> model = inject(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    >>> _, trained, frozen = nnx.split(model, trainable(model, config), ...)
    >>> sorted(params(trained))
    ['lora_A', 'lora_B']
    """
    tree = params(model)
    for item in iter_records(tree):
        check_config(item, config)
    leaves = jax.tree_util.tree_leaves_with_path(trainable_mask(tree, config))
    chosen = {tuple(k.key for k in path) for path, on in leaves if on}
    return lambda path, value: tuple(str(k) for k in path) in chosen


def functional(model: nnx.Module) -> Callable[..., Any]:
    """`apply(tree, *args, dropout_key=None, **kwargs)`: `model(*args, **kwargs)` with the
    parameters of `tree` (a `params(model)` dict, e.g. `lora_jax.combine(trainable, frozen)`
    inside `jax.grad`), as a pure function: `model` itself is never changed. With a
    `dropout_key` the call runs in train mode and every rng stream of the model (LoRA dropout's
    and the model's own, e.g. `nnx.Dropout`'s) starts from that key, as linen's
    `rngs={"dropout": key}` drives all dropout; without one it runs in eval mode.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = inject(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), LoraConfig(r=2, target_modules=".*"),
    ...                nnx.Rngs(1))
    >>> apply, tree = functional(model), params(model)
    >>> bool(jnp.array_equal(apply(tree, jnp.ones((1, 3))), model(jnp.ones((1, 3)))))
    True
    """
    graphdef, *states = nnx.split(model, nnx.Any(nnx.Param, LoraRecordVar), nnx.RngState, ...)
    template, streams, rest = states

    def reseed(path: tuple[Any, ...], leaf: Any, key: jax.Array) -> Any:
        """A stream's key restarted from `key` folded with the stream's path; its count 0."""
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names[-1] == "count":
            return jnp.zeros_like(leaf)
        for name in names[:-1]:
            key = jax.random.fold_in(key, zlib.crc32(name.encode()))
        return jax.random.split(key, leaf.shape) if leaf.shape else key  # stacked layers

    def apply(tree: Mapping[str, Any], *args: Any, dropout_key: jax.Array | None = None,
              **kwargs: Any) -> Any:
        # New States (new Variables, of this trace): the model's are never touched.
        state, rngs, others = (jax.tree.map(lambda leaf: leaf, s)
                               for s in (template, streams, rest))
        nnx.replace_by_pure_dict(state, dict(tree))
        if dropout_key is not None:
            rngs = jax.tree_util.tree_map_with_path(
                lambda path, leaf: reseed(path, leaf, dropout_key), rngs)
        copy = nnx.merge(graphdef, state, rngs, others)
        if dropout_key is None:
            copy.eval()
        else:
            copy.train()
        return copy(*args, **kwargs)

    return apply


def count_parameters(model: nnx.Module, config: LoraConfig) -> tuple[int, int]:
    """(trainable, total) parameter counts, as peft counts (`lora_jax.count_parameters`).

    >>> import jax.numpy as jnp
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> model = inject(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    >>> count_parameters(model, config)  # A [4, 2] + B [2, 4]; kernel + bias 20
    (16, 36)
    """
    return counting.count_parameters(params(model), config)


def print_trainable_parameters(model: nnx.Module, config: LoraConfig) -> None:
    """peft's line: `trainable params: X || all params: Y || trainable%: Z`.

    >>> import jax.numpy as jnp
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> model = inject(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    >>> print_trainable_parameters(model, config)
    trainable params: 16 || all params: 36 || trainable%: 44.4444
    """
    counting.print_trainable_parameters(params(model), config)


def _linen_form(tree: Mapping[str, Any], lin: str = "", nnx_path: str = "",
                paths: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """`tree` with `nnx.List` elements `h: {"0": ...}` named as the linen models name them
    (`h_0`), which peft io reads with `model_type`'s stacks; and {linen path: NNX path}."""
    paths = {} if paths is None else paths
    out: dict[str, Any] = {}
    join = lambda a, b: f"{a}.{b}" if a else str(b)
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            out[key] = value
            continue
        if value and all(str(k).isdigit() and isinstance(v, Mapping) for k, v in value.items()):
            items = [(f"{key}_{i}", join(nnx_path, f"{key}.{i}"), v) for i, v in value.items()]
        else:
            items = [(key, join(nnx_path, key), value)]
        for name, child_nnx, child in items:
            child_lin = join(lin, name)
            paths[child_lin] = child_nnx
            out[name] = _linen_form(child, child_lin, child_nnx, paths)[0]
    return out, paths


def save_peft(path: Any, model: nnx.Module, config: AdapterConfig, *args: Any,
              **kwargs: Any) -> None:
    """peft adapter files for `model` (`lora_jax.save_peft` on `params(model)`, with
    `nnx.List` elements named as peft io reads them); `model_type="gpt2"` / `"llama"` for the
    NNX reference models, `path_map` for others. A projection kernel of several axes (an
    einsum's [D, N, H]) is written as the PyTorch Linear of its row-major flattening."""
    peft_io.save_peft(path, _linen_form(params(model))[0], config, *args, **kwargs)


def load_peft(path: Any, model: nnx.Module, rngs: nnx.Rngs | Any = None, *,
              layouts: Mapping[str, Layout] | None = None, **kwargs: Any) -> AdapterConfig:
    """Put a peft adapter onto `model` in place (`lora_jax.load_peft` + `adapt`); returns its
    config (a `LoraConfig` or a variant's). A weight of several input / output axes (an
    einsum's [D, N, H]) or stored `[out, in]` reads peft's 2-D factors as the Linear of its
    row-major flattening (what `save_peft` writes) and gets factors of its own axes (A [D, r],
    B [r, N, H]). `layouts` (`lora_jax.nnx.layouts(model, x)`) for rules that must see a call;
    other keyword arguments go to `lora_jax.load_peft` (`model_type`, `stacks`, `path_map`)."""
    tree = params(model)
    found = _static_layouts(model, tree, layouts)
    linen, rename = _linen_form(tree)
    to_linen = {v: k for k, v in rename.items()}

    def linen_target(target: str, layout: Layout) -> str:
        name = layout.weight or "kernel"
        module = target[:-len(name) - 1] if target.endswith(f".{name}") else target
        return to_linen.get(module, module) + target[len(module):]

    loaded, config = peft_io.load_peft(path, linen, layouts={
        linen_target(t, layout): layout for t, layout in found.items()}, **kwargs)
    _adapt(model, loaded, rngs, rename)
    return config
