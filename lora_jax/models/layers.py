"""Layer pieces shared by the reference models: HF activation names and the `Layer` base module.

`Layer` holds the `config` / `dtype` / `param_dtype` fields every model module has, and builds
the flax layers LoRA adapts (`nn.Dense`, `nn.Embed`) and the architecture's norm, so a model
module only names them:

    class Block(Layer):                       # nn.LayerNorm with config.layer_norm_epsilon
        @nn.compact
        def __call__(self, x):
            return x + self.dense(x.shape[-1], "fc")(self.norm("ln")(x))
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

# HF activation names (transformers' ACT2FN) -> jax functions; "gelu" is the exact erf form.
ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False),
               "gelu_new": partial(jax.nn.gelu, approximate=True),
               "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
               "relu": jax.nn.relu,
               "silu": jax.nn.silu}


def activation(name: str) -> Any:
    """The jax function for an HF activation name; a ValueError naming the supported ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_task(model: str, task: str, supported: str) -> None:
    """A ValueError unless `task` is the architecture's only `supported` task."""
    if task != supported:
        raise ValueError(f"{model} supports task={supported!r} only, got {task!r}")


class Layer(nn.Module):
    """Base of the model modules: `config`, dtypes and factories for their flax layers.

    Subclasses set the class attributes `norm_cls` (nn.LayerNorm or nn.RMSNorm), `norm_eps`
    (the name of the config field with its epsilon) and `use_bias` (the projections' default).
    """

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    norm_cls: ClassVar[type[nn.Module]] = nn.LayerNorm
    norm_eps: ClassVar[str] = "layer_norm_epsilon"
    use_bias: ClassVar[bool] = True

    @property
    def layer_kwargs(self) -> dict[str, Any]:
        """`config`, `dtype`, `param_dtype`: the fields to pass on to a child module."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)

    def dense(self, features: int, name: str | None = None, use_bias: bool | None = None
              ) -> nn.Dense:
        """An nn.Dense; `use_bias` None = the class's `use_bias`."""
        return nn.Dense(features, use_bias=self.use_bias if use_bias is None else use_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def norm(self, name: str | None = None) -> nn.Module:
        """The architecture's `norm_cls` with the epsilon from `config.<norm_eps>`."""
        return self.norm_cls(epsilon=getattr(self.config, self.norm_eps), dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)

    def embed(self, num_embeddings: int, features: int, name: str | None = None) -> nn.Embed:
        """An nn.Embed (lookups through `__call__`, so LoRA sees them)."""
        return nn.Embed(num_embeddings, features, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)


class Stacked(Layer):
    """A `Layer` holding a layer stack: `scan_layers` (one `nn.scan`-ned stack) and
    `remat_policy` (a `jax.checkpoint_policies` name, or None), passed on with
    `stacked_kwargs`."""

    scan_layers: bool = False
    remat_policy: str | None = None

    @property
    def stacked_kwargs(self) -> dict[str, Any]:
        """`layer_kwargs` plus `scan_layers` and `remat_policy`."""
        return dict(self.layer_kwargs, scan_layers=self.scan_layers,
                    remat_policy=self.remat_policy)
