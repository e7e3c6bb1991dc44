"""Sharding: factor specs derived from the base's partitioning (specs, NamedShardings, Flax
logical metadata), the arrays' actual shardings, sharded training equal to one device, fsdp
memory, and clear errors for bad meshes, specs and batches."""

import sys
import warnings
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax.core.distributed import shard_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from train_sharded import make_train_step  # noqa: E402  (the step the example trains with)

from lora_jax.core.sharding import (
    lora_specs,
    match_specs,
    named_shardings,
    opt_state_specs,
    shard_inject,
)
from lora_jax.models import gpt2, llama

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape, names=MESH_AXES):
    # Auto axes: the compiler propagates shardings through the model (jax.make_mesh's default
    # in jax 0.10 is Explicit, which needs out_sharding annotations inside the model).
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def mesh222():
    return make_mesh((2, 2, 2))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(16, name="mlp")(x), None


class Tiny(nn.Module):
    """Embed, DenseGeneral with 2 output axes, DenseGeneral with 2 input axes, a scanned stack."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(64, 16, name="embed")(ids)
        x = nn.DenseGeneral((4, 8), name="qkv")(x)  # kernel [16, 4, 8]
        x = nn.DenseGeneral(16, axis=(-2, -1), name="o")(x)  # kernel [4, 8, 16]
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="layers")(x, None)  # kernel [3, 16, 16]
        return nn.Dense(64, name="head")(x)


TINY_RULES = [
    (r"embed\.embedding", P("tensor", "fsdp")),
    (r"qkv\.kernel", P("fsdp", "tensor", None)),
    (r"o\.kernel", P("tensor", None, "fsdp")),
    (r"layers\.mlp\.kernel", P(None, "fsdp", "tensor")),
    (r"head\.kernel", P("fsdp", "tensor")),
]
TINY_CONFIG = lora_jax.LoraConfig(r=4, target_modules=["embed", "qkv", "o", "mlp", "head"])
# (module, factor) -> (expected spec, expected per-device shard shape) on the 2x2x2 mesh.
TINY_EXPECTED = {
    ("embed", "lora_embedding_A"): (P("tensor", None), (32, 4)),
    ("embed", "lora_embedding_B"): (P(None, "fsdp"), (4, 8)),
    ("qkv", "lora_A"): (P("fsdp", None), (8, 4)),
    ("qkv", "lora_B"): (P(None, "tensor", None), (4, 2, 8)),
    ("o", "lora_A"): (P("tensor", None, None), (2, 8, 4)),
    ("o", "lora_B"): (P(None, "fsdp"), (4, 8)),
    ("layers", "lora_A"): (P(None, "fsdp", None), (3, 8, 4)),
    ("layers", "lora_B"): (P(None, None, "tensor"), (3, 4, 8)),
    ("head", "lora_A"): (P("fsdp", None), (8, 4)),
    ("head", "lora_B"): (P(None, "tensor"), (4, 32)),
}


def tiny():
    model, ids = Tiny(), jnp.zeros((2, 5), jnp.int32)
    return model, ids, model.init(jax.random.key(0), ids)["params"], lora_jax.layouts(model, ids)


def factor(tree, module, name):
    node = tree["layers"]["mlp"] if module == "layers" else tree[module]
    return node[name]


def test_specs_and_actual_shardings_dense_densegeneral_embed_scan():
    model, ids, params, layouts = tiny()
    mesh = mesh222()
    specs = match_specs(params, TINY_RULES)
    abstract = jax.eval_shape(partial(lora_jax.inject, config=TINY_CONFIG, layouts=layouts),
                              params, key=jax.random.key(1))
    derived = lora_specs(abstract, specs)
    injected = shard_inject(params, TINY_CONFIG, jax.random.key(1), mesh, specs=specs,
                            layouts=layouts)
    for (module, name), (spec, shard_shape) in TINY_EXPECTED.items():
        assert factor(derived, module, name) == spec, (module, name)
        array = factor(injected, module, name)
        assert array.sharding == NamedSharding(mesh, spec), (module, name)
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, (module, name)
    # The base leaves are placed on their specs too, and the values equal a plain inject.
    assert injected["layers"]["mlp"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    plain = lora_jax.inject(params, TINY_CONFIG, jax.random.key(1), layouts=layouts)
    for want, got in zip(jax.tree.leaves(plain), jax.tree.leaves(injected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The sharded adapted model computes what the single-device one does (float32, 1e-5).
    apply = jax.jit(lora_jax.wrap(model.apply, TINY_CONFIG))
    np.testing.assert_allclose(apply({"params": injected}, ids), apply({"params": plain}, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_shard_inject_of_an_init_that_changes_the_base_equals_inject(init):
    # Before: shard_inject drew the factors from the base's shapes only, so an initialiser that
    # reads the weight (PiSSA's SVD, OLoRA's QR, DoRA's magnitude) failed on it.
    model, ids, params, layouts = tiny()
    config = lora_jax.LoraConfig(r=4, target_modules=["qkv", "mlp", "head"],
                                 init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base becomes the residual
        injected = shard_inject(params, config, jax.random.key(1), mesh222(),
                                specs=match_specs(params, TINY_RULES), layouts=layouts)
        plain = lora_jax.inject(params, config, jax.random.key(1), layouts=layouts)
    assert injected["layers"]["mlp"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert not np.allclose(plain["head"]["kernel"], params["head"]["kernel"])  # residual base
    for want, got in zip(jax.tree.leaves(plain), jax.tree.leaves(injected), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_a_saved_tables_original_is_sharded_as_the_table():
    # modules_to_save on an embedding keeps the frozen original beside the trained table
    # (lora_jax.core.saved): it gets the table's spec, and shard_inject places it.
    _, ids, params, layouts = tiny()
    mesh = mesh222()
    specs = match_specs(params, TINY_RULES)
    config = lora_jax.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["embed"])
    abstract = jax.eval_shape(partial(lora_jax.inject, config=config, layouts=layouts),
                              params, key=jax.random.key(1))
    assert lora_specs(abstract, specs)["embed"]["embedding_original"] == P("tensor", "fsdp")
    injected = shard_inject(params, config, jax.random.key(1), mesh, specs=specs,
                            layouts=layouts)
    assert injected["embed"]["embedding_original"].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(injected["embed"]["embedding_original"],
                                  params["embed"]["embedding"])


class Logical(nn.Module):
    """Flax logical-axis metadata, including a scanned stack's layer axis."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")), name="up")(x)

        class LBlock(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return h + nn.Dense(32, kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("mlp", "embed")), name="proj")(h), None

        h, _ = nn.scan(LBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2, metadata_params={nn.PARTITION_NAME: "layers"})(
            name="stack")(x, None)
        return h


def test_logical_metadata_and_named_sharding_inputs_agree():
    model, x = Logical(), jnp.ones((4, 16))
    rules = [("embed", "fsdp"), ("mlp", "tensor"), ("layers", None)]
    mesh = mesh222()
    config = lora_jax.LoraConfig(r=2, target_modules=["up", "proj"])
    # Given by hand: lora_jax.layouts does not unbox nn.Partitioned params yet (see report).
    layouts = {"stack.proj": lora_jax.Layout("dense", stacked=1)}
    boxed = model.init(jax.random.key(0), x)["params"]
    assert isinstance(boxed["up"]["kernel"], nn.LogicallyPartitioned)
    from_metadata = shard_inject(boxed, config, jax.random.key(1), mesh, rules=rules,
                                 layouts=layouts)
    # The same base placed by jit(init) with the shardings the metadata implies.
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    out_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    placed = nn.unbox(jax.jit(model.init, out_shardings=out_shardings)(jax.random.key(0), x))
    placed = placed["params"]
    assert placed["stack"]["proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    from_arrays = shard_inject(placed, config, jax.random.key(1), mesh, layouts=layouts)
    expected = {("up", "lora_A"): P("fsdp", None), ("up", "lora_B"): P(None, "tensor"),
                ("stack", "lora_A"): P(None, "tensor", None),
                ("stack", "lora_B"): P(None, None, "fsdp")}
    for (module, name), spec in expected.items():
        for tree in (from_metadata, from_arrays):
            node = tree["stack"]["proj"] if module == "stack" else tree[module]
            assert node[name].sharding == NamedSharding(mesh, spec), (module, name)


def test_split_combine_merge_and_optimizer_state_keep_shardings():
    _, _, params, layouts = tiny()
    mesh = mesh222()
    specs = match_specs(params, TINY_RULES)
    params = shard_inject(params, TINY_CONFIG, jax.random.key(1), mesh, specs=specs,
                          layouts=layouts)
    shardings = jax.tree.map(lambda a: a.sharding, params)
    trainable, frozen = lora_jax.split(params, TINY_CONFIG)
    again = lora_jax.combine(trainable, frozen)
    assert jax.tree.map(lambda a: a.sharding, again) == shardings
    merged = jax.jit(partial(lora_jax.merge, config=TINY_CONFIG))(params)
    for path in (("qkv", "kernel"), ("layers", "mlp", "kernel"), ("embed", "embedding")):
        before, after = params, merged
        for key in path:
            before, after = before[key], after[key]
        assert after.sharding.is_equivalent_to(before.sharding, before.ndim), path
    tx = lora_jax.optimizer(optax.adam(1e-3), params, TINY_CONFIG)
    trainable_specs = jax.tree.map(lambda a: a.sharding.spec, trainable)
    state_specs = opt_state_specs(jax.eval_shape(tx.init, params), trainable_specs)
    state = jax.jit(tx.init, out_shardings=named_shardings(state_specs, mesh))(params)
    mu = state[0].mu
    assert mu["qkv"]["kernel"] is None and mu["qkv"]["lora_B"].sharding.spec == P(
        None, "tensor", None)
    assert mu["layers"]["mlp"]["lora_A"].sharding.spec == P(None, "fsdp", None)
    assert state[0].count.sharding.spec == P()


def test_clear_errors_before_compiling():
    _, _, params, layouts = tiny()
    mesh = mesh222()
    bad_axis = match_specs(params, [(r"head\.kernel", P("fsdp", "model"))])
    with pytest.raises(ValueError, match=r"'head.kernel' uses mesh axis 'model'.*data"):
        shard_inject(params, TINY_CONFIG, jax.random.key(1), mesh, specs=bad_axis,
                     layouts=layouts)
    # An unscanned spec on a scanned kernel: two entries for three axes (tunix #1186's bug).
    bad_rank = match_specs(params, [(r"layers\.mlp\.kernel", P("fsdp", "tensor"))])
    with pytest.raises(ValueError, match=r"'layers.mlp.kernel' has 2 entries .* 3 axes"):
        shard_inject(params, TINY_CONFIG, jax.random.key(1), mesh, specs=bad_rank,
                     layouts=layouts)
    too_long = match_specs(params, [(r"head\.bias", P("fsdp", None))])
    with pytest.raises(ValueError, match=r"'head.bias' has 2 entries but the weight has 1"):
        shard_inject(params, TINY_CONFIG, jax.random.key(1), mesh, specs=too_long,
                     layouts=layouts)
    indivisible = match_specs(params, [(r"o\.kernel", P(("fsdp", "tensor"), None, None))])
    with pytest.raises(ValueError, match=r"'o.kernel' .* axis 0 of size 4 .* \(8 devices\)"):
        shard_inject(params, TINY_CONFIG, jax.random.key(1), make_mesh(
            (1, 4, 2)), specs=indivisible, layouts=layouts)
    with pytest.raises(ValueError, match=r"6 rows does not divide over the 4 data-parallel"):
        shard_batch(np.zeros((6, 5), np.int32), mesh)
    with pytest.raises(ValueError, match="none of the batch axes"):
        shard_batch(np.zeros((8, 5), np.int32), make_mesh((8,), ("x",)))
    batch = shard_batch(np.arange(40).reshape(8, 5), mesh)
    assert batch.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch.addressable_shards} == {(2, 5)}


# --- training: GPT-2 and Llama on data x fsdp x tensor equal one device -------------------------

# The models' own SHARDING_RULES (the ones experiments/train_sharded.py uses).
MODELS = {
    "gpt2": (gpt2, gpt2.Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4),
             gpt2.SHARDING_RULES, ["c_attn", "c_proj", "c_fc", "wte"]),
    "llama": (llama, llama.Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=32),
              llama.SHARDING_RULES, "all-linear"),
}


@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=pytest.mark.full), "llama"])
def test_sharded_training_equals_single_device(name):
    module, model_config, rules, targets = MODELS[name]
    model = module.build(model_config, scan_layers=True)
    # The same batch each step, so that the loss must fall. (numpy and jit everywhere: each
    # eager jax op would compile on its own, which dominates this test's time.)
    ids = np.broadcast_to(np.random.default_rng(5).integers(
        0, model_config.vocab_size, (8, 9), dtype=np.int32), (3, 8, 9))
    base = jax.jit(lambda k: model.init(k, ids[0, :, :-1])["params"])(jax.random.key(0))
    layouts = lora_jax.layouts(model, ids[0, :, :-1])
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                 init_lora_weights=False)
    mesh = mesh222()

    def run(params, sharded):
        tx = lora_jax.optimizer(optax.adamw(3e-2), params, config)
        trainable, frozen = lora_jax.split(params, config)
        step = make_train_step(model, config, tx)
        if sharded:
            t_sh, f_sh = (jax.tree.map(lambda a: a.sharding, t) for t in (trainable, frozen))
            o_sh = named_shardings(opt_state_specs(
                jax.eval_shape(tx.init, params), jax.tree.map(lambda s: s.spec, t_sh)), mesh)
            opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
            b_sh = shard_batch(ids[0], mesh).sharding
            step = jax.jit(step, in_shardings=(t_sh, f_sh, o_sh, b_sh),
                           out_shardings=(t_sh, o_sh, NamedSharding(mesh, P())))
        else:
            opt_state, step = jax.jit(tx.init)(params), jax.jit(step)
        losses = []
        for i in range(ids.shape[0]):
            batch = shard_batch(ids[i], mesh) if sharded else ids[i]
            trainable, opt_state, loss = step(trainable, frozen, opt_state, batch)
            losses.append(float(loss))
        return losses, trainable, opt_state, frozen

    single = jax.jit(lambda p, k: lora_jax.inject(p, config, k, layouts=layouts))(
        base, jax.random.key(1))
    sharded = shard_inject(base, config, jax.random.key(1), mesh,
                           specs=match_specs(base, rules), layouts=layouts)
    want, want_t, _, _ = run(single, sharded=False)
    got, got_t, opt_state, frozen = run(sharded, sharded=True)
    assert want[0] > want[-1]  # it trains
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Factors (|x| ~ 0.4): Adam divides by sqrt(nu), which magnifies the float32 differences
    # of near-zero gradients summed in another order (up to lr per step in principle); measured
    # max 2e-4 after 3 steps at lr 3e-2, bound 1e-3.
    for a, b in zip(jax.tree.leaves(got_t), jax.tree.leaves(want_t), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-3)
    # The trained factors kept their derived shardings through the jitted steps.
    stack = got_t["transformer"]["h"]["attn"]["c_attn"] if name == "gpt2" else \
        got_t["model"]["layers"]["self_attn"]["q_proj"]
    assert stack["lora_A"].sharding.spec == P(None, "fsdp", None)
    assert stack["lora_B"].sharding.spec == P(None, None, "tensor")
    assert opt_state[0].mu is not None


def test_fsdp_base_bytes_per_device_and_optimizer_state_only_for_factors():
    model_config = MODELS["gpt2"][1]
    model = gpt2.build(model_config, scan_layers=True)
    ids = jnp.zeros((8, 8), jnp.int32)
    base = model.init(jax.random.key(0), ids)["params"]
    mesh = make_mesh((1, 8, 1))
    # Pure fsdp: every leaf's last axis over the 8 devices.
    fsdp = jax.tree.map(lambda a: P(*([None] * (a.ndim - 1)), "fsdp"), base)
    config = lora_jax.LoraConfig(r=2, target_modules=["c_attn", "c_fc"])
    params = shard_inject(base, config, jax.random.key(1), mesh, specs=fsdp,
                          layouts=lora_jax.layouts(model, ids))
    trainable, frozen = lora_jax.split(params, config)
    total = sum(a.nbytes for a in jax.tree.leaves(frozen))
    device0 = jax.devices()[0]
    per_device = sum(s.data.nbytes for a in jax.tree.leaves(frozen)
                     for s in a.addressable_shards if s.device == device0)
    assert per_device * 8 == total, (per_device, total)
    tx = lora_jax.optimizer(optax.adam(1e-3), params, config)
    state = tx.init(params)
    adam = state[0]
    paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in
                          jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert paths(adam.mu) == paths(adam.nu) == paths(trainable)
    assert all(p.endswith(("['lora_A']", "['lora_B']")) for p in paths(adam.mu))
    assert len(paths(adam.mu)) == 4  # A and B of c_attn and c_fc (scanned: one leaf each)
    factor_bytes = sum(a.nbytes for a in jax.tree.leaves(trainable))
    assert sum(a.nbytes for a in jax.tree.leaves((adam.mu, adam.nu))) == 2 * factor_bytes
    assert factor_bytes < total / 20
