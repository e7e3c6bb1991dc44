"""flax.linen adapter: `wrap` adds the LoRA deltas inside the adapted layers; `layouts` probes a
model for how to read its kernels.

The delta `scale * (dropout(x) @ A) @ B` is added after the layer's own call by a method
interceptor (`flax.linen.intercept_methods`) that reads the factors beside the layer's kernel, so
`W + A B` is never formed, and `nn.scan` / `nn.remat` stacks slice the factors with their layer.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.factors import EMBED_FACTORS, KERNEL_FACTORS, Layout, dropout
from lora_jax.partition import combine, split
from lora_jax.targets import iter_modules, join_path

_ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.Einsum)


class _EinsumParts(NamedTuple):
    lhs: str  # the input's letters
    lhs_rest: str  # the input's letters less the contracted ones
    contracted: str  # kernel letters contracted with the input (A's input axes)
    kernel_out: str  # kernel letters that reach the output (B's output axes)
    out: str


def _einsum_parts(einsum_str: str) -> _EinsumParts:
    """The letters of an `nn.Einsum` spec, split for the two factor contractions.

    Raises unless the kernel's axes are its contracted axes followed by output axes.
    """
    spec = einsum_str.replace(" ", "")
    lhs, rest = spec.split(",")
    kernel, out = rest.split("->")
    contracted = "".join(c for c in kernel if c in lhs and c not in out)
    kernel_out = "".join(c for c in kernel if c in out and c not in lhs)
    batch = [c for c in kernel if c in lhs and c in out]
    if batch or "." in kernel or kernel != contracted + kernel_out:
        raise ValueError(
            f"cannot adapt nn.Einsum {einsum_str!r}: LoRA needs a kernel whose axes are the "
            "contracted axes followed by output axes, with no batch axes shared by input, kernel "
            "and output. Exclude this module or reorder its kernel"
        )
    lhs_rest = "".join(c for c in lhs if c not in contracted)
    return _EinsumParts(lhs, lhs_rest, contracted, kernel_out, out)


def _layout_of(module: nn.Module, weight: jax.Array, call_args: tuple[Any, ...],
               call_kwargs: Mapping[str, Any]) -> Layout:
    if isinstance(module, nn.Embed):
        return Layout("embed", n_in=1)
    if isinstance(module, nn.Conv):
        return Layout("conv", n_in=weight.ndim - 1)
    if isinstance(module, nn.Einsum):
        parts = _einsum_parts(_einsum_str(module, call_args, call_kwargs))
        return Layout("einsum", n_in=len(parts.contracted))
    if isinstance(module, nn.DenseGeneral):
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        return Layout("dense", n_in=weight.ndim - len(features))
    return Layout("dense", n_in=1)


def _einsum_str(module: nn.Einsum, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    given = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return given if given is not None else module.einsum_str


def _delta(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], a: jax.Array,
           b: jax.Array, scale: float, dtype: jnp.dtype, rate: float,
           key: jax.Array | None) -> jax.Array:
    """scale * (dropout(x) @ A) @ B for one call of a supported layer, in `dtype`."""
    x = kwargs["inputs"] if "inputs" in kwargs else args[0]
    a, b = a.astype(dtype), b.astype(dtype)
    precision = getattr(module, "precision", None)
    if isinstance(module, nn.Embed):
        return jnp.matmul(jnp.take(a, x, axis=0) * scale, b, precision=precision)
    x = dropout(jnp.asarray(x, dtype), rate, key)
    if isinstance(module, nn.Conv):
        if module.feature_group_count != 1 or module.mask is not None:
            raise ValueError(
                f"{join_path(module.path)!r}: LoRA on a grouped or masked nn.Conv is not supported"
            )
        # A is a conv with the base's window, strides, padding and dilations; B is a 1x1 conv.
        conv_a = module.clone(parent=None, name=None, features=a.shape[-1], use_bias=False,
                              dtype=dtype)
        low = conv_a.apply({"params": {"kernel": a}}, x)
    elif isinstance(module, nn.Einsum):
        p = _einsum_parts(_einsum_str(module, args, kwargs))
        rank = next(c for c in string.ascii_letters if c not in p.lhs + p.out + p.kernel_out)
        low = jnp.einsum(f"{p.lhs},{p.contracted}{rank}->{p.lhs_rest}{rank}", x, a,
                         precision=precision)
        return jnp.einsum(f"{p.lhs_rest}{rank},{rank}{p.kernel_out}->{p.out}", low * scale, b,
                          precision=precision)
    elif isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            raise ValueError(
                f"{join_path(module.path)!r}: LoRA on nn.DenseGeneral with batch_dims is not "
                "supported"
            )
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        axes = tuple(sorted(ax % x.ndim for ax in axes))  # flax orders the kernel's axes so
        low = jnp.tensordot(x, a, axes=(axes, tuple(range(len(axes)))), precision=precision)
    else:
        low = jnp.matmul(x, a, precision=precision)
    return jnp.tensordot(low * scale, b, axes=1, precision=precision)


_TIED_HEAD_WARNING = (
    "{path!r} is adapted and also used as a tied output head (Embed.attend). As in peft, the "
    "adapter changes only the lookup, but merge() changes the shared table, so the merged model "
    "differs from the wrapped one in its head. Adapt the embedding only if you keep it unmerged."
)


def _interceptor(config: LoraConfig) -> Callable[..., Any]:
    def intercept(next_fun: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], context: Any) -> Any:
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "attend" and isinstance(module, nn.Embed) and \
                module.has_variable("params", EMBED_FACTORS[0]):
            warnings.warn(_TIED_HEAD_WARNING.format(path=join_path(module.path)), stacklevel=2)
        if context.method_name != "__call__" or module.scope is None:
            return out
        names = EMBED_FACTORS if isinstance(module, nn.Embed) else KERNEL_FACTORS
        if not module.has_variable("params", names[0]):
            return out
        path = join_path(module.path)
        if not isinstance(module, _ADAPTABLE):
            raise ValueError(
                f"{path!r} is a {type(module).__name__} holding LoRA factors; lora_jax adapts "
                "nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed and nn.Einsum. Exclude this module"
            )
        a = module.get_variable("params", names[0])
        b = module.get_variable("params", names[1])
        training = config.lora_dropout > 0 and module.has_rng("dropout")
        key = module.make_rng("dropout") if training else None
        delta = _delta(module, args, kwargs, a, b, config.scaling(path, rank=a.shape[-1]),
                       out.dtype, config.lora_dropout, key)
        return out + delta.astype(out.dtype)

    return intercept


def wrap(apply_fn: Callable[..., Any], config: LoraConfig) -> Callable[..., Any]:
    """`apply_fn` (e.g. `model.apply`) with the LoRA deltas added inside the adapted layers.

    Same signature as `apply_fn(variables, *args, **kwargs)`. Frozen leaves go through
    `stop_gradient`, so `jax.grad` of the whole params tree computes no weight gradients.
    LoRA dropout runs exactly when the call is given a "dropout" rng (`rngs={"dropout": key}`),
    i.e. while training; evaluate without one.

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraConfig, inject
    >>> model, x = nn.Dense(4), jnp.ones((1, 3))
    >>> config = LoraConfig(r=2, target_modules=".*")
    >>> params = inject(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1))
    >>> wrap(model.apply, config)({"params": params}, x).shape
    (1, 4)
    """
    interceptor = _interceptor(config)

    def apply(variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        trainable, frozen = split(variables["params"], config)
        params = combine(trainable, jax.tree.map(jax.lax.stop_gradient, frozen))
        with nn.intercept_methods(interceptor):
            return apply_fn({**variables, "params": params}, *args, **kwargs)

    return apply


def layouts(module: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Layout]:
    """{path: Layout} for every Dense, DenseGeneral, Conv, Embed and Einsum in `module`.

    Runs `module.init(key, *args, **kwargs)` abstractly (no FLOPs, no memory) and compares each
    layer's kernel, as the layer sees it, with the params tree: extra leading axes are stacked
    layers (nn.scan, nn.vmap). Small example inputs suffice.

    >>> import flax.linen as nn, jax.numpy as jnp
    >>> layouts(nn.DenseGeneral((2, 3), axis=(-2, -1)), jnp.ones((1, 4, 5)))
    {'': Layout(kind='dense', stacked=0, n_in=2)}
    """
    seen: dict[str, tuple[Layout, int]] = {}

    def record(next_fun: Callable[..., Any], call_args: tuple[Any, ...],
               call_kwargs: dict[str, Any], context: Any) -> Any:
        out = next_fun(*call_args, **call_kwargs)
        layer = context.module
        if (context.method_name == "__call__" and isinstance(layer, _ADAPTABLE)
                and layer.scope is not None):
            name = "embedding" if isinstance(layer, nn.Embed) else "kernel"
            if layer.has_variable("params", name):
                weight = nn.unbox(layer.get_variable("params", name))
                seen[join_path(layer.path)] = (
                    _layout_of(layer, weight, call_args, call_kwargs), weight.ndim)
        return out

    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
        shapes = nn.unbox(jax.eval_shape(lambda: module.init(rngs, *args, **kwargs))["params"])
    modules = dict(iter_modules(shapes))
    result = {}
    for path, (layout, inner_ndim) in seen.items():
        weight = modules[path]["embedding" if layout.kind == "embed" else "kernel"]
        result[path] = Layout(layout.kind, stacked=weight.ndim - inner_ndim, n_in=layout.n_in)
    return result
