"""flax.linen frontend: `wrap` adds the LoRA deltas inside the adapted layers; `layouts` probes a
model for how its layers read their weights.

The delta `scale * (dropout(x) @ A) @ B` is added after a layer's own call by a method
interceptor (`flax.linen.intercept_methods`) that finds the layer's rule (`lora_jax.core.rules`) and
the factors and record beside its weight, so `W + A B` is never formed, and `nn.scan` /
`nn.remat` stacks slice the factors with their layer. Weights adapted without a rule
(`target_parameters`) are materialised as `W + scale * A B` before the call, with a warning.

Nothing bypasses the interceptor silently. The variables carry a collection `lora_jax` holding
only a static key (no arrays) for the interceptor's state, so a lifted `nn.jit`, which caches its
trace by the module and the variables' structure, retraces under a new interceptor instead of
replaying a trace made without it. After the call, a layer that ran but never added its delta,
or a forward that reached none of the adapted layers, is an error naming them.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

import lora_jax.linen.rules  # noqa: F401  (registers the rules for flax's and others' layers)
from lora_jax.core.config import AdapterConfig
from lora_jax.core.factors import Layout
from lora_jax.core.forward import (
    STRATEGIES,
    TIED_HEAD_WARNING,
    Call,
    Strategy,
    check_ids,
    check_reading,
    forward,
    materialised,
)
from lora_jax.core.partition import combine, split
from lora_jax.core.record import (
    Adapted,
    check_config,
    iter_records,
    record_name,
    target_path,
    without_adapters,
)
from lora_jax.core.rules import read_layout, rule_for
from lora_jax.core.saved import is_original, original_name
from lora_jax.core.targets import iter_modules, join_path, unbox, with_leaves
from lora_jax.core.tied import contracted
from lora_jax.linen.quantized import quantized_calls
from lora_jax.quant.quantize import is_quantized

# Measured in experiments/benchmark.py (mixed-batch rows).
DEFAULT_STRATEGY: Strategy = "gather"
TRACE_COLLECTION = "lora_jax"


@dataclasses.dataclass(frozen=True)
class _TraceKey:
    """The interceptor's state as a static pytree node (no leaves): in the variables it keys
    lifted `nn.jit` caches, which ignore the interceptors around them."""

    value: Hashable


jax.tree_util.register_static(_TraceKey)
_unique = itertools.count()
# (params structure, strategy, mixed batch) of wrapped forwards that added their deltas when
# traced: a later call that reaches no layer replays such a trace (a cached nn.jit).
_reached: set[Hashable] = set()


def _keyed(variables: Mapping[str, Any], key: Hashable) -> dict[str, Any]:
    return {**variables, TRACE_COLLECTION: {"key": _TraceKey(key)}}


@dataclasses.dataclass
class _Trace:
    """What one wrapped call's interceptor saw: the module paths that ran a method, the
    adapted weights whose delta it added, and the tables it warned were read by `attend`."""

    visited: set[str] = dataclasses.field(default_factory=set)
    applied: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    attended: set[str] = dataclasses.field(default_factory=set)


def _check_no_orphans(module: nn.Module, path: str) -> None:
    """A module without a rule must not hold factors that expect one (they would be ignored)."""
    for name in ("lora", "lora_embedding"):
        record: Any = module.get_variable("params", name)
        if record is not None and not record.materialised:
            raise ValueError(
                f"{path!r} is a {type(module).__name__}, which has no layer rule, but holds LoRA "
                "factors: register a Rule for its class (lora_jax.register_rule), or target its "
                "weight with LoraConfig(target_parameters=[...]) to add W + scale * A B, or "
                "exclude it"
            )


def _original_head(module: nn.Module, args: tuple[Any, ...],
                   kwargs: Mapping[str, Any]) -> Any:
    """A tied head (`attend`) of a table in modules_to_save: computed from the frozen original,
    as peft's head reads the original table (`lora_jax.core.saved`); None without an original."""
    rule = rule_for(module)
    weight = None if rule is None else rule.weight_name(module)
    if weight is None or not module.has_variable("params", original_name(weight)):
        return None
    params = {k: v for k, v in module.variables["params"].items() if not is_original(k)}
    params[weight] = module.get_variable("params", original_name(weight))
    return module.clone(parent=None).apply({"params": params}, *args, method="attend", **kwargs)


def _foreign(module: nn.Module) -> bool:
    """Whether a module runs under its own `.apply` inside the forward (not in the model's
    tree: e.g. a head given a tied table), seen as a root without the trace key."""
    return not module.path and not module.has_variable(TRACE_COLLECTION, "key")


def _warn_tied(apply_fn: Callable[..., Any], variables: Mapping[str, Any], args: tuple[Any, ...],
               kwargs: Mapping[str, Any], adapted: list[Adapted], warned: set[str]) -> None:
    """Warn for each adapted table the base forward also contracts over its feature axis (a
    tied head however spelled: `h @ table.T`, a head `.apply`d with the table), found in the
    forward's jaxpr (`lora_jax.core.tied`); tables warned of through `attend` are skipped."""
    tables = {f"{item.path}.{item.record.weight}": item.target for item in adapted
              if item.record.layout.kind == "embed" and not item.record.layout.stacked
              and item.target not in warned}
    if not tables:
        return
    base = unbox(without_adapters(variables["params"]))
    positions = {i: (tables[key], 1) for i, (path, _) in enumerate(
        jax.tree_util.tree_leaves_with_path(base)) if (key := join_path(path)) in tables}
    jaxpr = jax.make_jaxpr(lambda p: apply_fn({**variables, "params": p}, *args, **kwargs))(base)
    for table in sorted(contracted(jaxpr, positions)):
        warnings.warn(TIED_HEAD_WARNING.format(path=table, how="a matmul over its table"),
                      stacklevel=3)


def _interceptor(ids: jax.Array | None, strategy: Strategy, trace: _Trace) -> Callable[..., Any]:
    """The interceptor of one wrapped call; `ids`: per-example adapter slots of a set; `trace`
    collects what it saw."""

    def intercept(next_fun: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], context: Any) -> Any:
        if context.method_name == "attend" and context.module.scope is not None:
            head = _original_head(context.module, args, kwargs)
            if head is not None:
                return head
        out = next_fun(*args, **kwargs)
        module = context.module
        if module.scope is None or context.method_name in ("setup", "__getattr__"):
            return out
        rule = rule_for(module)
        if _foreign(module):
            return out
        path = join_path(module.path)
        trace.visited.add(path)
        if context.method_name not in ("__call__", "attend"):
            return out
        if rule is None:
            _check_no_orphans(module, path)
            return out
        weight_name = rule.weight_name(module)
        record = module.get_variable("params", record_name(weight_name))
        if record is None:
            return out
        if context.method_name == "attend":
            trace.applied.add((path, weight_name))  # not a bypass: warned
            trace.attended.add(path)
            warnings.warn(TIED_HEAD_WARNING.format(path=path, how="Embed.attend"),
                          stacklevel=2)
            return out
        if record.materialised:
            return out
        weight = unbox(module.get_variable("params", weight_name))
        bias = unbox(module.get_variable("params", "bias"))  # None without one
        rng = lambda: module.make_rng("dropout") if module.has_rng("dropout") else None
        call = Call(rule, module, args, kwargs, out, weight, bias, record, rng,
                    f"{path!r} ({type(module).__name__})", ids, strategy)
        check_reading(call, "lora_jax.layouts")
        trace.applied.add((path, record.weight))
        return forward(call, *record.read(lambda name: module.get_variable("params", name)))

    return intercept


def _check_applied(trace: _Trace, adapted: list[Adapted], key: Hashable, partial: bool) -> None:
    """Raise for an adapted weight whose layer ran without its delta, or (unless the call is
    `partial`: another `method=`) when the forward reached none of them and no trace of the
    same structure did."""
    wanted = {(item.path, item.record.weight): item.target for item in adapted
              if not item.record.materialised}
    skipped = [target for (path, weight), target in wanted.items()
               if path in trace.visited and (path, weight) not in trace.applied]
    if skipped:
        raise ValueError(
            f"{skipped[:5]} ran in the wrapped forward without their LoRA delta (called through "
            "a method other than __call__?): call them as layers, or register a Rule for how "
            "they are called")
    if trace.applied:
        _reached.add(key)
    elif wanted and not partial and key not in _reached:
        raise ValueError(
            f"the wrapped forward reached none of the {len(wanted)} adapted layers "
            f"({list(wanted.values())[:5]}), so it would be the base model's: a transform "
            "that replays a trace made without lora_jax's interceptor (a jax.jit or custom "
            "cache inside the model) or a model that reads its weights itself bypasses it. "
            "Call the adapted layers as flax modules inside the wrapped apply")


def materialise(params: Mapping[str, Any], adapted: list[Adapted]) -> dict[str, Any]:
    """`params` with each rule-less adapted weight replaced by W + scale * A B (differentiable in
    A and B); weights with a rule are left alone."""
    updates: dict[str, dict[str, Any]] = {}
    for item in adapted:
        if not item.record.materialised:
            continue
        updates.setdefault(item.path, {})[item.record.weight] = materialised(
            f"{item.path}.{item.record.weight}", item.record, unbox(item.weight),
            *item.record.read(item.module.__getitem__), stacklevel=3)
    return with_leaves(params, updates) if updates else dict(params)


def _check_not_quantized(trainable: Mapping[str, Any]) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(trainable, is_leaf=is_quantized)
    for path, leaf in leaves:
        if is_quantized(leaf):
            raise ValueError(
                f"{join_path(path)!r} is quantized but would train (modules_to_save or bias): "
                "keep it in float (lora_jax.quantize(..., modules_to_save=...) skips it)"
            )


def wrap(apply_fn: Callable[..., Any], config: AdapterConfig, *,
         strategy: Strategy = DEFAULT_STRATEGY) -> Callable[..., Any]:
    """`apply_fn` (e.g. `model.apply`) with the LoRA deltas added inside the adapted layers.

    Same signature as `apply_fn(variables, *args, **kwargs)`. The rank, scale and dropout rate
    of each adapted weight come from its record (set at `inject`); `config` decides which other
    leaves train (bias, modules_to_save) and must describe the same ranks and scales (a config
    that does not raises). Frozen leaves go through `stop_gradient`, so `jax.grad` of the
    whole params tree computes no weight gradients. LoRA dropout runs exactly when the call is
    given a "dropout" rng (`rngs={"dropout": key}`), i.e. while training; evaluate without one.
    Params holding an adapter set (`lora_jax.adapters`) take `adapter_ids=` (one slot per
    example, -1 for none): a mixed batch, computed by `strategy` ("gather", "onehot" or
    "ragged"; see `lora_jax.core.forward`).

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraConfig, inject
    >>> model, x = nn.Dense(4), jnp.ones((1, 3))
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> params = inject(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1))
    >>> wrap(model.apply, config)({"params": params}, x).shape
    (1, 4)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mixed-batch strategy {strategy!r}; use one of {STRATEGIES}")

    def apply(variables: Mapping[str, Any], *args: Any, adapter_ids: Any = None,
              **kwargs: Any) -> Any:
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                "wrap(apply_fn, config) takes the variables dict as its first argument, like "
                "model.apply: pass {\"params\": params}, not the params tree itself")
        ids = None if adapter_ids is None else check_ids(adapter_ids)
        adapted = list(iter_records(variables["params"]))
        for item in adapted:
            check_config(item, config)
        trace = _Trace()
        trainable, frozen = split(variables["params"], config)
        _check_not_quantized(trainable)
        params = combine(trainable, jax.tree.map(jax.lax.stop_gradient, frozen))
        params = materialise(params, adapted)
        # The trace depends on the ids' values when they are concrete (else on the tracer).
        mixed = None if ids is None else np.asarray(ids).tobytes() if not isinstance(
            ids, jax.core.Tracer) else next(_unique)
        structure = (jax.tree.structure(variables["params"]), strategy, ids is None)
        # Inside the LoRA interceptor: layers on a quantized base (linen_quantized).
        with nn.intercept_methods(_interceptor(ids, strategy, trace)), \
                nn.intercept_methods(quantized_calls):
            out = apply_fn(_keyed({**variables, "params": params}, (strategy, mixed)), *args,
                           **kwargs)
        _check_applied(trace, adapted, structure, "method" in kwargs)
        _warn_tied(apply_fn, variables, args, kwargs, adapted, trace.attended)
        if "mutable" in kwargs and isinstance(out, tuple) and isinstance(out[-1], Mapping):
            out = (*out[:-1], {k: v for k, v in out[-1].items() if k != TRACE_COLLECTION})
        return out

    return apply


def layouts(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Layout]:
    """{path: Layout} for every layer with a rule in `module` (see `lora_jax.core.rules`).

    Runs `module.init(key, *args, **kwargs)` abstractly (no FLOPs, no memory) and asks each
    layer's rule how it reads its weight on that call; extra leading axes in the params tree
    are stacked layers (nn.scan, nn.vmap). A layer LoRA cannot apply to gets a layout with an
    `error`, raised by `inject` only if the layer is targeted. Small example inputs suffice.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> layouts(nn.DenseGeneral((2, 3), axis=(-2, -1)), jnp.ones((1, 4, 5)))
    {'': Layout(kind='dense', stacked=0, n_in=2, order=None, rule='flax.linen.linear.DenseGeneral', weight='kernel', error=None, assumed=False)}
    """  # noqa: E501
    seen: dict[tuple[str, str], tuple[Layout, int]] = {}

    def record(next_fun: Callable[..., Any], call_args: tuple[Any, ...],
               call_kwargs: dict[str, Any], context: Any) -> Any:
        out = next_fun(*call_args, **call_kwargs)
        layer = context.module
        rule = rule_for(layer)
        if context.method_name == "__call__" and rule is not None and layer.scope is not None \
                and layer.has_variable("params", rule.weight_name(layer)):
            name = rule.weight_name(layer)
            weight = unbox(layer.get_variable("params", name))
            seen[(join_path(layer.path), name)] = (
                read_layout(rule, layer, name, weight, call_args, call_kwargs), weight.ndim)
        return out

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    # A new trace key for each call: a lifted nn.jit retraces under this interceptor.
    init = lambda: module.apply(_keyed({}, next(_unique)), *args, rngs=rngs, mutable=True,
                                **kwargs)[1]
    with nn.intercept_methods(record):
        shapes = unbox(jax.eval_shape(init)["params"])
    modules = dict(iter_modules(shapes, leaves=None))
    result = {}
    for (path, name), (layout, inner_ndim) in seen.items():
        node = modules.get(path)
        # A layer called through its own `.apply` (a tied head) is not in this tree: skip it.
        if node is None or name not in node or node[name].ndim < inner_ndim:
            continue
        stacked = node[name].ndim - inner_ndim
        result[target_path(path, name, node)] = dataclasses.replace(layout, stacked=stacked)
    return result
