"""Small flax.linen models of every layer kind lora_jax adapts, shared by the core tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ("dense", "dense_general", "conv", "embed", "einsum")


def single_layer(kind, dim, out, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """(model, example input) for one layer of `kind`, named "layer" inside a wrapper."""

    class Single(nn.Module):
        @nn.compact
        def __call__(self, x):
            kw = dict(dtype=dtype, param_dtype=param_dtype, name="layer")
            if kind == "dense":
                return nn.Dense(out, **kw)(x)
            if kind == "dense_general":
                return nn.DenseGeneral((out, 3), axis=(-2, -1), **kw)(x)
            if kind == "conv":
                return nn.Conv(out, (3, 2), strides=(2, 1), padding="SAME", **kw)(x)
            if kind == "embed":
                return nn.Embed(dim, out, **kw)(x)
            return nn.Einsum((dim, 2, out), "btd,dnh->btnh", **kw)(x)

    key = jax.random.key(7)
    if kind == "dense":
        x = jax.random.normal(key, (4, dim))
    elif kind == "dense_general":
        x = jax.random.normal(key, (4, dim, 2))
    elif kind == "conv":
        x = jax.random.normal(key, (2, 6, 5, dim))
    elif kind == "embed":
        x = jax.random.randint(key, (3, 5), 0, dim)
    else:
        x = jax.random.normal(key, (2, 3, dim))
    if kind != "embed":
        x = x.astype(dtype)
    return Single(), x


class Block(nn.Module):
    """A pre-norm transformer-ish block: attention-like projections, an MLP, dropout."""

    width: int = 16

    @nn.compact
    def __call__(self, x, deterministic=True):
        h = nn.LayerNorm(name="ln")(x)
        q = nn.Dense(x.shape[-1], name="q")(h)
        v = nn.Dense(self.width, name="v")(h)
        h = jax.nn.softmax(q @ h.swapaxes(-1, -2) / 4.0) @ v
        h = nn.Dropout(0.1, deterministic=deterministic)(h)
        x = x + nn.Dense(x.shape[-1], name="o")(h)
        return x + nn.Dense(x.shape[-1], name="mlp")(jax.nn.gelu(x)), None


class TinyLM(nn.Module):
    """Embed -> n blocks (a Python list, or one nn.scan + nn.remat stack named "h") -> head."""

    vocab: int = 32
    dim: int = 8
    layers: int = 3
    scan: bool = False

    @nn.compact
    def __call__(self, ids, deterministic=True):
        x = nn.Embed(self.vocab, self.dim, name="wte")(ids)
        if self.scan:
            stack = nn.scan(nn.remat(Block, static_argnums=(2,)), variable_axes={"params": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=self.layers)
            x, _ = stack(name="h")(x, deterministic)
        else:
            for i in range(self.layers):
                x, _ = Block(name=f"h_{i}")(x, deterministic)
        return nn.Dense(self.vocab, name="lm_head")(x)


def unscanned_params(scanned, layers):
    """TinyLM params of the scanned stack "h" laid out as h_0, h_1, ... ."""
    out = {k: v for k, v in scanned.items() if k != "h"}
    for i in range(layers):
        out[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], scanned["h"])
    return out
