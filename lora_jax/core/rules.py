"""Layer rules: how LoRA applies to a module class.

A `Rule` names the module classes it serves (by qualified name, so nothing imports the packages
that define them), which param is the weight, how to read the weight's axes for one call (a
`Layout`), and the low-rank product `(x @ A) @ B` on that call's input. The frontend adds
`scale *` it to the layer's output. flax's five layers and three layers from other packages
(transformers' FlaxConv1D, Gemma's Einsum, MaxText's DenseGeneral) ship as rules
(`lora_jax.linen.rules`); a user adds one for their own layer:

>>> import flax.linen as nn, jax, jax.numpy as jnp, lora_jax
>>> from lora_jax import Layout, Rule, register_rule
>>> from lora_jax.core.factors import dense_delta
>>> class Proj(nn.Module):  # stores its kernel [out, in]
...     features: int
...     @nn.compact
...     def __call__(self, x):
...         w = self.param("w", nn.initializers.normal(), (self.features, x.shape[-1]))
...         return x @ w.T
>>> rule = register_rule(Rule(
...     names=(f"{Proj.__module__}.{Proj.__qualname__}",), weight="w",
...     layout=lambda module, w, args, kwargs: Layout("dense", order="oi"),
...     delta=lambda module, x, a, b, args, kwargs: dense_delta(x, a, b)))
>>> x = jnp.ones((2, 3))
>>> model = Proj(4)
>>> config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
>>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
...                          jax.random.key(1), layouts=lora_jax.layouts(model, x))
>>> params["w_lora_A"].shape, params["w_lora_B"].shape  # A [in, r], B [r, out]
((3, 2), (2, 4))
>>> wrapped = lora_jax.wrap(model.apply, config)({"params": params}, x)
>>> merged = model.apply({"params": lora_jax.merge(params, config)}, x)
>>> bool(jnp.allclose(wrapped, merged, atol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.core.factors import Layout, dense_delta, einsum_roles, embed_delta, project


class NotAdaptable(ValueError):
    """Raised by a rule's `layout` for a module LoRA cannot apply to (the reason as message)."""


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    for name in ("inputs", "x"):
        if name in kwargs:
            return kwargs[name]
    return args[0]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How LoRA applies to the module classes `names` (`module.qualname` strings).

    - `weight`: the param name of the weight, or a function of the module giving it.
    - `layout(module, weight, args, kwargs) -> Layout`: the weight's axes for this call (the
      weight as the module sees it, without stacked axes); raise `NotAdaptable` if LoRA cannot
      apply.
    - `delta(module, x, a, b, args, kwargs) -> array`: `(x @ A) @ B` shaped like the output,
      for the input `x` (after LoRA dropout) and factors without stacked axes.
    - `inputs(args, kwargs) -> x`: the call's input (default: `inputs=`/`x=` or the first arg).
    - `dropout`: whether LoRA dropout applies to the input (not for an embedding's ids).
    - `base(module, x, weight, args, kwargs) -> array`: the layer's product without its bias, for
      another input (DoRA with dropout recomputes it on the dropped input, as peft does).
    - `matmul`: whether `delta` is `dense_delta(x, a, b)` over x's last axis (a bool, or a
      function of the module): mixed adapter batches may then use grouped or one-hot matmuls.
    - `parameter`: the weight is a parameter peft adapts by name (`target_parameters`, e.g. MoE
      experts), not a module: only `target_parameters` selects it, never `target_modules`.

    >>> import flax.linen as nn, lora_jax
    >>> dense = rule_for(nn.Dense(4))  # flax's own layers' rules (lora_jax.linen.rules)
    >>> dense.name, dense.weight_name(nn.Dense(4)), dense.dropout, dense.is_matmul(nn.Dense(4))
    ('flax.linen.linear.Dense', 'kernel', True, True)
    """

    names: tuple[str, ...]
    layout: Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Layout]
    delta: Callable[..., Any]
    weight: str | Callable[[Any], str] = "kernel"
    inputs: Callable[[tuple[Any, ...], Mapping[str, Any]], Any] = _first_input
    dropout: bool = True
    base: Callable[..., Any] | None = None
    matmul: bool | Callable[[Any], bool] = False
    parameter: bool = False

    @property
    def name(self) -> str:
        return self.names[0]

    def is_matmul(self, module: Any) -> bool:
        return self.matmul if isinstance(self.matmul, bool) else self.matmul(module)

    def weight_name(self, module: Any) -> str:
        return self.weight if isinstance(self.weight, str) else self.weight(module)


_RULES: dict[str, Rule] = {}


def qualname(cls: type) -> str:
    """`module.QualName` of a class, the key rules are registered under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_rule(rule: Rule) -> Rule:
    """Make `rule` serve its classes (and their subclasses); a later rule for a name wins.
    The module docstring adapts a layer of its own this way.

    >>> from lora_jax.core.factors import dense_delta
    >>> rule = Rule(names=("my_package.layers.Proj",), weight="w",
    ...             layout=lambda module, w, args, kwargs: Layout("dense", order="oi"),
    ...             delta=lambda module, x, a, b, args, kwargs: dense_delta(x, a, b))
    >>> register_rule(rule) is rule, rule_named("my_package.layers.Proj") is rule
    (True, True)
    """
    if not rule.names:
        raise ValueError("Rule.names must name at least one module class")
    for name in rule.names:
        _RULES[name] = rule
    return rule


def rule_for(module: Any) -> Rule | None:
    """The rule for a module's class or its nearest registered base class."""
    for cls in type(module).__mro__:
        rule = _RULES.get(qualname(cls))
        if rule is not None:
            return rule
    return None


def rule_named(name: str | None) -> Rule | None:
    """The registered rule called `name` (its first class name)."""
    return None if name is None else _RULES.get(name)


def read_layout(rule: Rule, module: Any, name: str, weight: Any, args: tuple[Any, ...],
                kwargs: Mapping[str, Any], **fields: Any) -> Layout:
    """The layout `rule` gives `module`'s weight `name` on a call, naming the rule and weight
    (and setting `fields`, e.g. `stacked`); one with the reason as `error` if `NotAdaptable`."""
    try:
        layout = rule.layout(module, weight, args, dict(kwargs))
    except NotAdaptable as e:
        return Layout("dense", rule=rule.name, weight=name, error=str(e), **fields)
    return dataclasses.replace(layout, rule=rule.name, weight=name, **fields)


# --- pieces the frontends' rules share (flax.linen and nnx layers have the same fields) ---------

def axes(value: Any) -> tuple[int, ...]:
    """An `axis` / `features` field as a tuple."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def flax_dense_delta(module: Any, x: Any, a: Any, b: Any, args: Any, kwargs: Any) -> Any:
    """The delta of flax's dense layers (linen's Dense / DenseGeneral, nnx's Linear /
    LinearGeneral): over the module's `axis` (the last without one), at its precision."""
    return dense_delta(x, a, b, axes(getattr(module, "axis", -1)), precision=module.precision)


def flax_dense_base(module: Any, x: Any, w: Any, args: Any, kwargs: Any) -> Any:
    """The product of flax's dense layers without their bias (as `flax_dense_delta`)."""
    return project(x, w, axes(getattr(module, "axis", -1)), precision=module.precision)


def lookup_delta(module: Any, ids: Any, a: Any, b: Any, args: Any, kwargs: Any) -> Any:
    """An embedding lookup's delta `A[ids] @ B`."""
    return embed_delta(ids, a, b)


def einsum_equation(module: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """flax's Einsum's equation: the call's `einsum_str` (keyword or second argument), else the
    module's (None in neither)."""
    given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return given if given is not None else module.einsum_str


def einsum_layout(equation: str) -> Layout:
    """The layout of an einsum kernel; `NotAdaptable` when its axes do not split into input and
    output axes."""
    roles, why = einsum_roles(equation)
    if why:
        raise NotAdaptable(
            f"{why}. Exclude this module, or register a Rule for it (lora_jax.register_rule)"
        )
    return Layout("einsum", order=roles)


def conv_layout(module: Any, weight: Any, args: Any, kwargs: Any) -> Layout:
    """A convolution's layout (window and input channels in, features out); grouped or masked
    convolutions have no low-rank delta of the same structure."""
    if module.feature_group_count != 1 or module.mask is not None:
        raise NotAdaptable(
            f"a grouped (feature_group_count={module.feature_group_count}) or masked "
            f"{type(module).__name__} has no low-rank delta of the same structure; exclude it or "
            "target its weight with target_parameters (materialised W + A B)"
        )
    return Layout("conv", n_in=weight.ndim - 1)
