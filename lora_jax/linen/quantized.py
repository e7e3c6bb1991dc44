"""flax.linen layers on a quantized base weight: the layer's product goes through
`lora_jax.quant.quantize.quantized_product`, so the backward of a training step dequantizes the
frozen weight again instead of keeping the float weight from the forward (no remat needed).

`lora_jax.wrap` installs `quantized_calls` (a method interceptor) inside its LoRA interceptor:
a layer whose rule has a `base` product (Dense, DenseGeneral, Conv, transformers' FlaxConv1D,
MaxText's DenseGeneral) and whose weight is quantized (`NF4Tensor`, `Int8Tensor`,
`GGMLTensor`) computes `base(x, W) + bias` itself, in the dtype flax's `promote_dtype` would
pick. Other layers read the quantized weight through `jnp.asarray` as before (dequantized where
they use it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core.rules import rule_for
from lora_jax.core.targets import unbox
from lora_jax.quant.quantize import is_quantized, quantized_product


def _field(module: Any, name: str, default: Any = None) -> Any:
    """A module's attribute, `default` if it has none, without running its class's
    `__getattr__` (found in the instance or its class, the lookup never reaches it)."""
    found = name in vars(module) or hasattr(type(module), name)
    return getattr(module, name) if found else default


def quantized_calls(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    context: Any) -> Any:
    """A `flax.linen.intercept_methods` interceptor: a ruled layer with a quantized weight
    computes its output with `quantized_product`; any other call runs unchanged."""
    module = context.module
    rule = rule_for(module) if module.scope is not None and context.method_name == "__call__" \
        else None
    if rule is None or rule.base is None:
        return next_fun(*args, **kwargs)
    base = rule.base
    weight = unbox(module.get_variable("params", rule.weight_name(module)))
    # A layer with its own dot_general (e.g. AQT / fp8 injection) keeps its own product. Read
    # without `getattr`: a module's own `__getattr__` (Gemma's) is a module method, which would
    # call this interceptor again.
    if not is_quantized(weight) or _field(module, "dot_general") not in (
            None, jax.lax.dot_general) or _field(module, "dot_general_cls") is not None:
        return next_fun(*args, **kwargs)
    x = rule.inputs(args, kwargs)
    use_bias = _field(module, "use_bias", True)
    bias = unbox(module.get_variable("params", "bias")) if use_bias else None
    dtype = _field(module, "dtype") or jnp.result_type(
        *(v.dtype for v in (x, weight, bias) if v is not None))

    def product(x: jax.Array, w: jax.Array) -> jax.Array:
        return base(module, x, w.astype(dtype), args, kwargs)

    out = quantized_product(product, jnp.asarray(x, dtype), weight)
    return out if bias is None else out + jnp.asarray(bias, dtype)
