"""The two frontends behind one small interface, so each contract is written once: build a layer
kind's model (optionally on a quantized base, or with its weight sharded on a mesh), inject a
config, run it adapted or merged, read its params tree, train it, write and read peft files."""

import functools
from contextlib import nullcontext
from types import SimpleNamespace

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import lora_jax
from contract import layers
from lora_jax import nnx as lnnx

QUANTIZED = {"linen": ("nf4", "int8"), "nnx": ()}  # the bases each frontend adapts quantized
# kinds whose weights a quantized base holds (`lora_jax.quantize`: kernels; NF4: 64-blocks)
QUANTIZED_KINDS = {"nf4": ("dense", "conv"), "int8": ("dense", "dense_general", "conv", "einsum")}
# (frontend, kind) -> what save_peft says for a weight peft files do not hold
PEFT_REFUSED = {("linen", "conv"): "has no PyTorch Linear/Embedding layout",
                ("nnx", "conv"): "has no PyTorch Linear/Embedding layout"}
MESH_SHAPE = (2, 4)
LOSS = lambda out: (out.astype(np.float32) ** 2).mean()


def mesh():
    return jax.make_mesh(MESH_SHAPE, ("fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def leaves(tree):
    """{dotted path: array} of a params tree's arrays (records and None left out)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): value
            for path, value in flat if hasattr(value, "shape")}


@functools.cache  # one model, base and base output per kind, shared by every test of it
def _linen_base(kind, base):
    model, x, targets = layers.linen(kind)
    params = model.init(jax.random.key(0), x)["params"]
    quantized = params if base == "float" else lora_jax.quantize(params, base)
    base_out = model.apply({"params": params if base == "float" else
                            lora_jax.dequantize(quantized)}, x)
    return SimpleNamespace(model=model, x=x, targets=targets, float_base=params, base=quantized,
                           layouts=lora_jax.layouts(model, x), base_out=base_out,
                           apply=jax.jit(model.apply))


class Linen:
    """A linen layer kind: params, `lora_jax.inject` / `wrap` / `merge` / `split`."""

    name = "linen"

    def __init__(self, kind, base="float", sharded=False):
        self.kind, self.sharded = kind, sharded
        self.__dict__.update(vars(_linen_base(kind, base)))

    def inject(self, config, key=1):
        self.config = config
        if self.sharded:
            spec = P(*layers.SHARDING[self.kind])
            specs = lora_jax.sharding.match_specs(self.base, [(r"layer\.(kernel|embedding)",
                                                               spec)])
            self.params = lora_jax.shard_inject(self.base, config, jax.random.key(key), mesh(),
                                                specs=specs, layouts=self.layouts)
        else:
            self.params = lora_jax.inject(self.base, config, jax.random.key(key),
                                          layouts=self.layouts)
        return self

    def out(self):
        return lora_jax.wrap(self.model.apply, self.config)({"params": self.params}, self.x)

    def merged_out(self):
        return self.apply({"params": lora_jax.merge(self.params, self.config)}, self.x)

    def tree(self):
        return self.params

    def train(self, steps=3):
        """`steps` jitted Adam steps on the trainable half (`split` / `combine`); the losses."""
        apply = lora_jax.wrap(self.model.apply, self.config)
        trainable, frozen = lora_jax.split(self.params, self.config)
        tx = optax.adam(1e-2)

        @jax.jit
        def step(trainable, state):
            loss, grads = jax.value_and_grad(lambda t: LOSS(apply(
                {"params": lora_jax.combine(t, frozen)}, self.x)))(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, loss

        state, losses = tx.init(trainable), []
        for _ in range(steps):
            trainable, state, loss = step(trainable, state)
            losses.append(float(loss))
        self.params = lora_jax.combine(trainable, frozen)
        return losses

    def base_layer(self):
        return self.float_base["layer"]

    def save_peft(self, folder):
        lora_jax.save_peft(folder, self.params, self.config)

    def load_peft(self, folder):
        """This kind's base with the adapter in `folder` (`lora_jax.load_peft`)."""
        other = Linen.__new__(Linen)
        other.__dict__.update(self.__dict__)
        other.params, other.config = lora_jax.load_peft(folder, self.base, layouts=self.layouts)
        return other


class Nnx:
    """An NNX layer kind: the model, `lora_jax.nnx.inject` / `merge` / `trainable` /
    `nnx.Optimizer`."""

    name = "nnx"

    def __init__(self, kind, base="float", sharded=False):
        assert base == "float", "the NNX frontend adapts float bases"
        self.kind, self.sharded = kind, sharded
        names = layers.SHARDING[kind] if sharded else None
        with jax.set_mesh(mesh()) if sharded else nullcontext():
            self.model, self.x, self.targets = layers.nnx_model(kind, names)
        self.float_base = lnnx.params(self.model)
        self.base_out = self.model(self.x)

    def inject(self, config, key=1):
        self.config = config
        with jax.set_mesh(mesh()) if self.sharded else nullcontext():
            lnnx.inject(self.model, config, key)
        return self

    def out(self):
        return self.model(self.x)

    def merged_out(self):
        return lnnx.merge(self.model, self.config)(self.x)

    def tree(self):
        return lnnx.params(self.model)

    def train(self, steps=3):
        """`steps` Adam steps under `nnx.jit` on what `lora_jax.nnx.trainable` selects."""
        wrt = lnnx.trainable(self.model, self.config)
        x = self.x

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(lambda m: LOSS(m(x)),
                                             argnums=nnx.DiffState(0, wrt))(model)
            optimizer.update(model, grads)
            return loss

        with jax.set_mesh(mesh()) if self.sharded else nullcontext():
            optimizer = nnx.Optimizer(self.model, optax.adam(1e-2), wrt=wrt)
            return [float(step(self.model, optimizer)) for _ in range(steps)]

    def base_layer(self):
        return self.float_base["layer"]

    def save_peft(self, folder):
        lnnx.save_peft(folder, self.model, self.config)

    def load_peft(self, folder):
        """This kind's base with the adapter in `folder` (`lora_jax.nnx.load_peft`)."""
        other = Nnx(self.kind)
        other.config = lnnx.load_peft(folder, other.model)
        return other


FRONTENDS = {"linen": Linen, "nnx": Nnx}
KINDS = {"linen": layers.LINEN, "nnx": layers.CORE}
