"""Layer rules for flax.linen modules: flax's Dense, DenseGeneral, Conv, Embed and Einsum, and
three layers from other packages, matched by class name so that those packages are never
imported: transformers' Flax `FlaxConv1D` (GPT-2; kernel `[out, in]`), Gemma's `Einsum`
(weight `w`, equation given at call time) and MaxText's `DenseGeneral` (`self.param` +
`lax.dot_general`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lora_jax.core import rules
from lora_jax.core.factors import Layout, dense_delta, einsum_delta, project
from lora_jax.core.rules import NotAdaptable, Rule, axes, qualname, register_rule

# --- flax's own layers ----------------------------------------------------------------------------

def _dense_general_layout(module: nn.DenseGeneral, weight: Any, args: Any, kwargs: Any) -> Layout:
    if module.batch_dims:
        raise NotAdaptable("nn.DenseGeneral with batch_dims (a kernel per batch index) has no "
                           "low-rank form here; exclude it")
    return Layout("dense", n_in=weight.ndim - len(axes(module.features)))


def _conv(module: nn.Conv, x: Any, kernel: Any) -> Any:
    """The module's own convolution with another kernel (same window, strides, padding and
    dilations), no bias."""
    conv = module.clone(parent=None, name=None, features=kernel.shape[-1], use_bias=False,
                        dtype=x.dtype)
    return conv.bind({"params": {"kernel": kernel}})(x)


def _conv_delta(module: nn.Conv, x: Any, a: Any, b: Any, args: Any, kwargs: Any) -> Any:
    # A is a conv with the base's window, strides, padding and dilations; B is a 1x1 conv.
    return jnp.tensordot(_conv(module, x, a), b, axes=1, precision=module.precision)


def _flax_einsum_str(module: nn.Einsum, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    equation = rules.einsum_equation(module, args, kwargs)
    if equation is None:
        raise ValueError("nn.Einsum needs an einsum_str, on the module or in the call")
    return equation


register_rule(Rule(
    names=(qualname(nn.Dense),),
    layout=lambda module, weight, args, kwargs: Layout("dense"),
    delta=rules.flax_dense_delta, base=rules.flax_dense_base, matmul=True))
register_rule(Rule(
    names=(qualname(nn.DenseGeneral),), layout=_dense_general_layout,
    delta=rules.flax_dense_delta, base=rules.flax_dense_base,
    matmul=lambda module: axes(module.axis) in ((-1,),) and not module.batch_dims))
register_rule(Rule(
    names=(qualname(nn.Conv),), layout=rules.conv_layout, delta=_conv_delta,
    base=lambda module, x, w, args, kwargs: _conv(module, x, w)))
register_rule(Rule(
    names=(qualname(nn.Embed),), weight="embedding", dropout=False,
    layout=lambda module, weight, args, kwargs: Layout("embed"), delta=rules.lookup_delta))
register_rule(Rule(
    names=(qualname(nn.Einsum),),
    layout=lambda module, weight, args, kwargs: rules.einsum_layout(
        _flax_einsum_str(module, args, kwargs)),
    delta=lambda module, x, a, b, args, kwargs: einsum_delta(
        _flax_einsum_str(module, args, kwargs), x, a, b, precision=module.precision)))


# --- layers of other packages ---------------------------------------------------------------------

# transformers' Flax GPT-2: `kernel` is [features, in] and the call is `x @ kernel.T`.
register_rule(Rule(
    names=("transformers.models.gpt2.modeling_flax_gpt2.FlaxConv1D",),
    layout=lambda module, weight, args, kwargs: Layout("dense", order="oi"),
    delta=lambda module, x, a, b, args, kwargs: dense_delta(
        x, a, b, precision=getattr(module, "precision", None)),
    base=lambda module, x, w, args, kwargs: project(x, w.T, precision=getattr(
        module, "precision", None)),
    matmul=True))


def _gemma_equation(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return kwargs["eqn"] if "eqn" in kwargs else args[0]


# Gemma (`gemma.gm.nn`): `Einsum(shape, weight_name="w")(eqn, x)`. The q/k/v (and k/v) axis
# leads both kernel and output (`BTD,SNDH->SBTNH`), so each projection keeps its own factors; the
# MLP's gate/up axis follows the batch axes (`...F,NHF->...NH`), so gate and up share A and B
# spans both (one fused projection, as gemma's own LoRA treats it).
register_rule(Rule(
    names=("gemma.gm.nn._layers.Einsum", "gemma.layers.Einsum"),
    weight=lambda module: getattr(module, "weight_name", "w"),
    inputs=lambda args, kwargs: kwargs["x"] if "x" in kwargs else args[1],
    layout=lambda module, weight, args, kwargs: rules.einsum_layout(_gemma_equation(args, kwargs)),
    delta=lambda module, x, a, b, args, kwargs: einsum_delta(
        _gemma_equation(args, kwargs), x, a, b)))

# MaxText: `DenseGeneral(features, axis)` holds `kernel` [*in, *features] and contracts `axis`.
register_rule(Rule(
    names=("MaxText.layers.linears.DenseGeneral", "maxtext.layers.linears.DenseGeneral"),
    layout=lambda module, weight, args, kwargs: Layout(
        "dense", n_in=len(axes(getattr(module, "axis", -1)))),
    delta=lambda module, x, a, b, args, kwargs: dense_delta(
        x, a, b, axes(getattr(module, "axis", -1))),
    base=lambda module, x, w, args, kwargs: project(x, w, axes(getattr(module, "axis", -1)))))
