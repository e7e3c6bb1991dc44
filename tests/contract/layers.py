"""The layer kinds of the contract suite: for each frontend, a small model whose adapted layers
are of one kind, its input and the config fields that target them; the weight's sharding on a
(fsdp 2, tensor 4) mesh and its PyTorch twin (peft's Linear / Embedding) where it has them.

Core kinds (`CORE`: Dense, DenseGeneral, Conv, Embed, Einsum) in both frontends; in linen also
the shipped rules for other packages' layers, a user-registered rule and the materialising
fallback (`RULES`), each in a plain model and in a scanned + remat stack (`<kind>-scan`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from layer_zoo import KINDS as CORE
from layer_zoo import single_layer
from third_party_layers import DenseGeneral, FlaxConv1D, GemmaAttention, GemmaFeedForward

import lora_jax
from lora_jax import Layout, Rule
from lora_jax.core.factors import dense_delta

DIM = OUT = 8  # divisible by both mesh axes; an 8 x 8 kernel is one NF4 block
LAYER = {"target_modules": ["layer"]}


# --- linen: the rules for other packages' layers, a user rule, the fallback ---------------------

class UserProj(nn.Module):
    """A user's layer: weight `w` stored [out, in]."""

    features: int

    @nn.compact
    def __call__(self, x):
        return x @ self.param("w", nn.initializers.normal(0.5), (self.features, x.shape[-1])).T


lora_jax.register_rule(Rule(
    names=(f"{UserProj.__module__}.{UserProj.__qualname__}",), weight="w",
    layout=lambda module, w, args, kwargs: Layout("dense", order="oi"),
    delta=lambda module, x, a, b, args, kwargs: dense_delta(x, a, b)))


class Experts(nn.Module):
    """A mixture-of-experts weight [experts, in, out] in a module no rule knows."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.3), (3, DIM, DIM))
        return jnp.einsum("btd,edf->btf", x, w) / 3


class MaxTextMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = DenseGeneral((2, 6), name="wi")(x)
        return DenseGeneral(DIM, axis=(-2, -1), name="wo")(jnp.tanh(hidden))


# kind -> (layer factory, LoraConfig fields selecting its weights)
RULES = {
    "flax_conv1d": (lambda: FlaxConv1D(DIM, name="c_attn"), {"target_modules": ["c_attn"]}),
    "gemma_qkv": (lambda: GemmaAttention(name="attn"),
                  {"target_modules": ["qkv_einsum", "attn_vec_einsum"]}),
    "gemma_gqa": (lambda: GemmaAttention(kv_heads=1, name="attn"),
                  {"target_modules": ["q_einsum", "kv_einsum", "attn_vec_einsum"]}),
    "gemma_mlp": (lambda: GemmaFeedForward(name="mlp"),
                  {"target_modules": ["gating_einsum", "linear"]}),
    "maxtext": (lambda: MaxTextMlp(name="mlp"), {"target_modules": ["wi", "wo"]}),
    "user_rule": (lambda: UserProj(DIM, name="proj"), {"target_modules": ["proj"]}),
    "fallback": (lambda: Experts(name="experts"), {"target_parameters": ["experts.w"]}),
}


class Block(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x, _=None):
        return x + RULES[self.kind][0]()(x), None


class Model(nn.Module):
    """Two blocks of one rule kind: `h_0`, `h_1`, or a scanned + remat stack `h`."""

    kind: str
    scan: bool

    @nn.compact
    def __call__(self, x):
        if self.scan:
            stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                            split_rngs={"params": True}, length=2)
            return stack(self.kind, name="h")(x, None)[0]
        for i in range(2):
            x = Block(self.kind, name=f"h_{i}")(x)[0]
        return x


X = jax.random.normal(jax.random.key(3), (2, 3, DIM))
LINEN = CORE + tuple(f"{kind}{stack}" for kind in RULES for stack in ("", "-scan"))


def linen(kind):
    """(model, input, targeting config fields) of a linen kind."""
    if kind in CORE:
        return (*single_layer(kind, DIM, OUT), LAYER)
    name = kind.removesuffix("-scan")
    return Model(name, kind.endswith("-scan")), X, RULES[name][1]


# --- NNX: the core kinds ------------------------------------------------------------------------

class Single(nnx.Module):
    """The NNX twin of layer_zoo.single_layer: the layer as attribute `layer`, its weight
    partitioned over `names` (mesh axes) when given."""

    def __init__(self, kind, rngs, names=None):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0) \
            if kind == "embed" else nnx.initializers.lecun_normal()  # the layers' defaults
        init = nnx.with_partitioning(init, names) if names else init
        if kind == "dense":
            self.layer = nnx.Linear(DIM, OUT, kernel_init=init, rngs=rngs)
        elif kind == "dense_general":
            self.layer = nnx.LinearGeneral((DIM, 2), (OUT, 3), axis=(-2, -1), kernel_init=init,
                                           rngs=rngs)
        elif kind == "conv":
            self.layer = nnx.Conv(DIM, OUT, (3, 2), strides=(2, 1), padding="SAME",
                                  kernel_init=init, rngs=rngs)
        elif kind == "embed":
            self.layer = nnx.Embed(DIM, OUT, embedding_init=init, rngs=rngs)
        else:
            self.layer = nnx.Einsum("btd,dnh->btnh", (DIM, 2, OUT), (2, OUT), kernel_init=init,
                                    rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


def nnx_model(kind, names=None):
    """(model, input, targeting config fields) of an NNX kind."""
    return Single(kind, nnx.Rngs(0), names), single_layer(kind, DIM, OUT)[1], LAYER


# --- sharding and peft twins of the core kinds --------------------------------------------------

# The weight's mesh axes: inputs over fsdp, outputs over tensor (an embedding's rows over tensor).
SHARDING = {"dense": ("fsdp", "tensor"), "dense_general": ("fsdp", None, "tensor", None),
            "conv": (None, None, "fsdp", "tensor"), "embed": ("tensor", "fsdp"),
            "einsum": ("fsdp", None, "tensor")}


def torch_twin(kind, layer):
    """The PyTorch model peft adapts for a core kind, built from the layer's base weights (its
    params dict): `layer`, a Linear over the flattened input and output axes or an Embedding;
    and the function running a model (the twin, or peft's on it) on the layer's input, its
    output flattened as the twin gives it. None for a kind peft files do not hold (Conv)."""
    import torch

    if kind == "conv":
        return None
    if kind == "embed":
        twin, n_in = torch.nn.Embedding(DIM, OUT), None
        weights = {"weight": layer["embedding"]}
    else:
        kernel = np.asarray(layer["kernel"])
        n_in = 2 * DIM if kind == "dense_general" else DIM
        twin = torch.nn.Linear(n_in, kernel.size // n_in)
        weights = {"weight": kernel.reshape(n_in, -1).T, "bias": np.ravel(layer["bias"])}
    with torch.no_grad():
        for name, value in weights.items():
            getattr(twin, name).copy_(torch.from_numpy(np.array(value)))

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = twin

        def forward(self, x):
            return self.layer(x)

    def run(model, x):
        x = torch.from_numpy(np.asarray(x).reshape(-1, n_in)) if n_in else \
            torch.from_numpy(np.asarray(x)).long()
        with torch.no_grad():
            return model(x).numpy()

    return Holder().eval(), run
