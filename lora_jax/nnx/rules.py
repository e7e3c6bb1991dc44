"""Layer rules for Flax NNX modules: `nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.Embed`
and `nnx.Einsum`.

They are ordinary `lora_jax.Rule`s (the same registry and the same delta functions as the linen
rules in `lora_jax.linen.rules`), registered under the NNX class names. An NNX module knows its
weight's shape from its own attributes, so each rule here also says how many axes the weight
has (`NnxRule.weight_ndim`): extra leading axes on the stored weight are stacked layers
(`nnx.vmap` / `nnx.scan` stacks), and no example input is needed to read a model.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any, cast

import jax.numpy as jnp
from flax import nnx

from lora_jax.core import rules
from lora_jax.core.factors import Layout, einsum_delta
from lora_jax.core.rules import NotAdaptable, Rule, qualname, register_rule


@dataclasses.dataclass(frozen=True)
class NnxRule(Rule):
    """A `Rule` that also knows the number of axes of its module's own weight (without stacked
    layers) from the module's attributes; None: read it from an example call
    (`lora_jax.nnx.layouts`), or take the stored weight as unstacked."""

    weight_ndim: Callable[[Any], int] | None = None


# --- nnx.Linear --------------------------------------------------------------------------------

register_rule(NnxRule(
    names=(qualname(nnx.Linear),),
    weight_ndim=lambda module: 2,
    layout=lambda module, weight, args, kwargs: Layout("dense"),
    delta=rules.flax_dense_delta, base=rules.flax_dense_base))


# --- nnx.LinearGeneral: kernel [*batch, *in_features, *out_features]; like linen's DenseGeneral it
# contracts the input's `axis` in increasing order, as dense_delta does ----------------------------

def _linear_general_layout(module: nnx.LinearGeneral, weight: Any, args: Any,
                           kwargs: Any) -> Layout:
    if module.batch_axis:
        raise NotAdaptable("nnx.LinearGeneral with batch_axis (a kernel per batch index) has no "
                           "low-rank form here; exclude it")
    return Layout("dense", n_in=len(module.in_features))


register_rule(NnxRule(
    names=(qualname(nnx.LinearGeneral),),
    weight_ndim=lambda module: len(module.batch_axis) + len(module.in_features)
    + len(module.out_features),
    layout=_linear_general_layout, delta=rules.flax_dense_delta, base=rules.flax_dense_base))


# --- nnx.Conv ------------------------------------------------------------------------------------

_CONV_FIELDS = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation",
                "feature_group_count", "precision", "promote_dtype", "conv_general_dilated",
                "preferred_element_type")


def _conv(module: nnx.Conv, x: Any, kernel: Any) -> Any:
    """nnx.Conv's own call with another kernel (same window, strides, padding, dilations), no
    bias."""
    shim = types.SimpleNamespace(**{name: getattr(module, name) for name in _CONV_FIELDS},
                                 in_features=kernel.shape[-2], out_features=kernel.shape[-1],
                                 kernel=kernel, bias=None, use_bias=False, mask=None,
                                 dtype=x.dtype)
    return nnx.Conv.__call__(cast(nnx.Conv, shim), x)  # the attributes Conv.__call__ reads


def _conv_delta(module: nnx.Conv, x: Any, a: Any, b: Any, args: Any, kwargs: Any) -> Any:
    # A is a convolution with the base's window, strides, padding and dilations; B is 1x1.
    return jnp.tensordot(_conv(module, x, a), b, axes=1, precision=module.precision)


register_rule(NnxRule(
    names=(qualname(nnx.Conv),),
    weight_ndim=lambda module: len(module.kernel_size) + 2,
    layout=rules.conv_layout,
    delta=_conv_delta,
    base=lambda module, x, w, args, kwargs: _conv(module, x, w)))


# --- nnx.Embed (the lookup; `attend`, a tied head, is left alone as in peft) ---------------------

register_rule(NnxRule(
    names=(qualname(nnx.Embed),), weight="embedding", dropout=False,
    weight_ndim=lambda module: 2,
    layout=lambda module, weight, args, kwargs: Layout("embed"), delta=rules.lookup_delta))


# --- nnx.Einsum: the equation from the call (`einsum_str=`) or the module ------------------------

def _einsum_str(module: nnx.Einsum, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    equation = rules.einsum_equation(module, args, kwargs)
    if equation is None:
        raise NotAdaptable(
            "its einsum_str is given only at call time; pass "
            "layouts=lora_jax.nnx.layouts(model, *example_inputs) to inject"
        )
    return equation


register_rule(NnxRule(
    names=(qualname(nnx.Einsum),),
    weight_ndim=lambda module: len(module.kernel_shape),
    layout=lambda module, weight, args, kwargs: rules.einsum_layout(
        _einsum_str(module, args, kwargs)),
    delta=lambda module, x, a, b, args, kwargs: einsum_delta(
        _einsum_str(module, args, kwargs).replace(" ", ""), x, a, b,
        precision=module.precision)))


# --- layers of other packages ------------------------------------------------------------------

def _kernel_spec(equation: str) -> str:
    return equation.replace(" ", "").split("->")[0].split(",")[1]


# tunix's NNX models (`tunix.models.{llama3,qwen2,qwen3,gemma,gemma3}.model.Einsum`): weight `w`,
# equation `einsum_str` fixed at construction (e.g. q_proj 'BTD,DNH->BTNH', o_proj
# 'BTNH,NHD->BTD', Gemma's stacked qkv 'BTD,SNDH->SBTNH'), called as `einsum(x)`.
register_rule(NnxRule(
    names=tuple(f"tunix.models.{m}.model.Einsum" for m in ("llama3", "qwen2", "qwen3", "gemma",
                                                          "gemma3")),
    weight="w",
    weight_ndim=lambda module: len(_kernel_spec(module.einsum_str)),
    layout=lambda module, weight, args, kwargs: rules.einsum_layout(module.einsum_str),
    delta=lambda module, x, a, b, args, kwargs: einsum_delta(
        module.einsum_str.replace(" ", ""), x, a, b)))
