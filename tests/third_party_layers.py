"""Layers with the exact structure (class qualname, param names, axis order, call signature) of
projection layers in packages lora_jax does not install: transformers 4.x's Flax `FlaxConv1D`,
Gemma's `Einsum` (`gemma.gm.nn._layers`) and MaxText's linen `DenseGeneral`. They are written
from those packages' public definitions, so the shipped rules match them by name; the real
packages are exercised by experiments/real_layers.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class FlaxConv1D(nn.Module):
    """transformers.models.gpt2.modeling_flax_gpt2.FlaxConv1D: kernel [features, in]."""

    __module__ = "transformers.models.gpt2.modeling_flax_gpt2"
    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, inputs):
        inputs = jnp.asarray(inputs, self.dtype)
        kernel = self.param("kernel", nn.initializers.normal(0.02),
                            (self.features, inputs.shape[-1]))
        kernel = jnp.asarray(kernel.transpose(), self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        if self.use_bias:
            y = y + jnp.asarray(self.param("bias", nn.initializers.zeros, (self.features,)),
                                self.dtype)
        return y


class Einsum(nn.Module):
    """gemma.gm.nn._layers.Einsum: weight `weight_name`, equation given at call time."""

    __module__ = "gemma.gm.nn._layers"
    shape: tuple[int, ...]
    weight_name: str = "w"
    initializer: nn.initializers.Initializer = nn.initializers.normal()

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param(self.weight_name, self.initializer, self.shape)
        return jnp.einsum(eqn, x, w)


class DenseGeneral(nn.Module):
    """MaxText.layers.linears.DenseGeneral: `self.param("kernel")` [*in, *features] +
    `lax.dot_general` over `axis`."""

    __module__ = "MaxText.layers.linears"
    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1

    @nn.compact
    def __call__(self, inputs):
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        axis = tuple(a % inputs.ndim for a in axis)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            tuple(inputs.shape[a] for a in axis) + features)
        contract = tuple(range(len(axis)))
        return jax.lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))


class GemmaAttention(nn.Module):
    """Gemma's attention projections: stacked q/k/v (`qkv_einsum`) or q + stacked k/v."""

    heads: int = 2
    kv_heads: int = 2
    dim: int = 8
    head_dim: int = 4

    @nn.compact
    def __call__(self, x):
        if self.kv_heads == self.heads:
            q, k, v = Einsum((3, self.heads, self.dim, self.head_dim), name="qkv_einsum")(
                "BTD,SNDH->SBTNH", x)
        else:
            q = Einsum((self.heads, self.dim, self.head_dim), name="q_einsum")("BTD,NDH->BTNH", x)
            k, v = Einsum((2, self.kv_heads, self.dim, self.head_dim), name="kv_einsum")(
                "BSD,CKDH->CBSKH", x)
            k, v = (jnp.repeat(t, self.heads // self.kv_heads, axis=2) for t in (k, v))
        probs = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k), axis=-1)
        mixed = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        return Einsum((self.heads, self.head_dim, self.dim), name="attn_vec_einsum")(
            "BTNH,NHD->BTD", mixed)


class GemmaFeedForward(nn.Module):
    """Gemma's MLP: two Einsums sharing this module's scope (`nn.share_scope`), so `gating_einsum`
    (gate and up stacked) and `linear` are weights of one params dict."""

    dim: int = 8
    hidden: int = 12

    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, self.dim, self.hidden), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NFH->...NH", x)
        linear = Einsum((self.hidden, self.dim), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", nn.gelu(gate[..., 0, :]) * gate[..., 1, :])
