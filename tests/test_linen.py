"""wrap: the delta inside each layer, and composition with jit, grad, vmap, scan, remat, dropout
(default init, adapted == merged, training per layer kind: the contract suite, tests/contract)."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from layer_zoo import KINDS, TinyLM, single_layer, unscanned_params

import lora_jax
from lora_jax import LoraConfig

IDS = jnp.arange(10).reshape(2, 5) % 32
RTOL = 1e-5  # float32: relative to the output's largest magnitude


def _adapted(kind, dim, out, r, dtype=jnp.float32):
    model, x = single_layer(kind, dim, out, dtype=dtype, param_dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"], init_lora_weights=False)
    params = model.init(jax.random.key(0), x)["params"]
    params = lora_jax.inject(params, config, jax.random.key(1), layouts=lora_jax.layouts(model, x))
    return model, x, config, params


def _assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(np.abs(expected).max(), 1e-6)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_base_with_float32_factors(kind):
    model, x, config, params = _adapted(kind, 8, 6, 2, dtype=jnp.bfloat16)
    wrapped = lora_jax.wrap(model.apply, config)({"params": params}, x)
    assert wrapped.dtype == jnp.bfloat16
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    model32, x32 = single_layer(kind, 8, 6)
    reference = lora_jax.wrap(model32.apply, config)(
        {"params": f32}, x if kind == "embed" else x.astype(jnp.float32))
    _assert_close(wrapped, reference, rtol=3e-2)  # bfloat16 keeps ~3 significant digits


def test_the_product_a_b_is_never_formed():
    """No dot_general of A [in, r] with B [r, out] in the forward or the gradient."""
    dim, out, r = 12, 10, 3
    model, x, config, params = _adapted("dense", dim, out, r)
    apply = lora_jax.wrap(model.apply, config)
    loss = lambda p: apply({"params": p}, x).sum()

    def products(jaxpr):
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes = sorted(tuple(v.aval.shape) for v in eqn.invars)
                found.append(shapes)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found += products(sub)
        return found

    forward = products(jax.make_jaxpr(loss)(params).jaxpr)
    backward = products(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    ab = sorted([(dim, r), (r, out)])
    assert forward and backward
    assert ab not in forward and ab not in backward
    # The check can fail: merge does form the product.
    merged = products(jax.make_jaxpr(lambda p: lora_jax.merge(p, config))(params).jaxpr)
    assert ab in merged


def test_gradients_reach_only_the_factors():
    model, x, config, params = _adapted("dense", 8, 6, 2)
    apply = lora_jax.wrap(model.apply, config)
    grads = jax.grad(lambda p: (apply({"params": p}, x) ** 2).sum())(params)["layer"]
    assert not grads["kernel"].any() and not grads["bias"].any()
    assert grads["lora_A"].any() and grads["lora_B"].any()


def test_jit_and_grad_compose():
    model, x, config, params = _adapted("dense", 8, 6, 2)
    apply = lora_jax.wrap(model.apply, config)
    loss = lambda p: (apply({"params": p}, x) ** 2).sum()
    eager = jax.grad(loss)(params)
    jitted = jax.jit(jax.grad(loss))(params)
    jax.tree.map(lambda a, b: _assert_close(a, b), jitted, eager)


def test_dropout_only_with_a_dropout_rng():
    model = TinyLM()
    config = LoraConfig(r=2, target_modules=["q", "v"], lora_dropout=0.5,
                        init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(0), IDS)["params"], config,
                             jax.random.key(1))
    apply = lora_jax.wrap(model.apply, config)
    evaluation = apply({"params": params}, IDS)
    no_dropout = lora_jax.wrap(model.apply, LoraConfig(r=2, target_modules=["q", "v"]))(
        {"params": params}, IDS)
    np.testing.assert_array_equal(evaluation, no_dropout)  # no rng: no dropout at all
    key = {"dropout": jax.random.key(5)}
    train_a = apply({"params": params}, IDS, rngs=key)
    train_b = apply({"params": params}, IDS, rngs={"dropout": jax.random.key(6)})
    np.testing.assert_array_equal(train_a, apply({"params": params}, IDS, rngs=key))
    assert not np.allclose(train_a, evaluation) and not np.allclose(train_a, train_b)


def test_vmap_over_a_stack_of_adapters_sharing_one_base():
    model, x, config, params = _adapted("dense", 8, 6, 2)
    trainable, frozen = lora_jax.split(params, config)
    adapters = [lora_jax.split(lora_jax.inject(frozen_only, config, jax.random.key(k)), config)[0]
                for k, frozen_only in enumerate([lora_jax.merge(params, config)] * 3)]
    adapters = [jax.tree.map(lambda a, k=k: a + k, t) for k, t in enumerate(adapters)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *adapters)
    apply = lora_jax.wrap(model.apply, config)
    batched = jax.vmap(lambda t: apply({"params": lora_jax.combine(t, frozen)}, x))(stacked)
    for k, adapter in enumerate(adapters):
        single = apply({"params": lora_jax.combine(adapter, frozen)}, x)
        _assert_close(batched[k], single)
    del trainable


def test_scanned_and_remat_stack_equals_the_unrolled_model():
    scanned_model, plain_model = TinyLM(scan=True), TinyLM(scan=False)
    config = LoraConfig(r=2, target_modules=["q", "v", "wte"], init_lora_weights=False)
    scanned = lora_jax.inject(scanned_model.init(jax.random.key(0), IDS)["params"], config,
                              jax.random.key(1), layouts=lora_jax.layouts(scanned_model, IDS))
    plain = unscanned_params(scanned, 3)
    run = lambda model, p: lora_jax.wrap(model.apply, config)({"params": p}, IDS)
    _assert_close(run(scanned_model, scanned), run(plain_model, plain))
    loss = lambda model: (lambda p: (run(model, p) ** 2).mean())
    g_scanned = jax.jit(jax.grad(loss(scanned_model)))(scanned)
    g_plain = jax.jit(jax.grad(loss(plain_model)))(plain)
    _assert_close(unscanned_params(g_scanned, 3)["h_1"]["q"]["lora_A"],
                  g_plain["h_1"]["q"]["lora_A"])
    _assert_close(run(scanned_model, scanned),
                  scanned_model.apply({"params": lora_jax.merge(scanned, config)}, IDS))


def test_factors_on_an_unsupported_layer_are_an_error():
    class RawLinear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))

    x = jnp.ones((2, 6))
    model = RawLinear()
    config = LoraConfig(r=2, target_modules=".*")
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(1))
    with pytest.raises(ValueError, match="'' is a RawLinear, which has no layer rule"):
        lora_jax.wrap(model.apply, config)({"params": params}, x)


def test_an_einsum_with_batch_axes_cannot_be_adapted():
    model, x = nn.Einsum((2, 6, 4), "bnd,ndo->bno"), jnp.ones((3, 2, 6))
    found = lora_jax.layouts(model, x)  # an untargeted module never raises
    assert "shared by input, kernel and output" in found[""].error
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="cannot adapt '': kernel axis 'n' of 'bnd,ndo->bno' "
                                         "is shared by input, kernel and output"):
        lora_jax.inject(params, LoraConfig(r=2, target_modules=".*"), jax.random.key(1),
                        layouts=found)


def test_layouts_reads_scanned_stacks_and_layer_kinds():
    found = lora_jax.layouts(TinyLM(scan=True), IDS)
    assert found["wte"] == lora_jax.Layout("embed", rule="flax.linen.linear.Embed",
                                           weight="embedding")
    assert found["h.q"] == lora_jax.Layout("dense", stacked=1, n_in=1,
                                           rule="flax.linen.linear.Dense", weight="kernel")
    assert (found["lm_head"].kind, found["lm_head"].stacked) == ("dense", 0)
    conv, x = single_layer("conv", 6, 5)
    found = lora_jax.layouts(conv, x)["layer"]
    assert (found.kind, found.stacked, found.n_in) == ("conv", 0, 3)


def test_layouts_reads_logically_partitioned_params():
    class Partitioned(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(6, kernel_init=init, name="proj")(x)

    found = lora_jax.layouts(Partitioned(), jnp.ones((2, 4)))
    assert list(found) == ["proj"]
    assert (found["proj"].kind, found["proj"].stacked, found["proj"].n_in) == ("dense", 0, 1)


def test_dense_general_with_unsorted_axes():
    """Flax sorts DenseGeneral's input axes; the delta must contract in the same order."""
    model = nn.DenseGeneral(5, axis=(-1, -2))
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    config = LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(1), x)["params"], config,
                             jax.random.key(2), layouts=lora_jax.layouts(model, x))
    _assert_close(lora_jax.wrap(model.apply, config)({"params": params}, x),
                  model.apply({"params": lora_jax.merge(params, config)}, x))


def test_an_adapted_tied_embedding_warns():
    class TiedLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            wte = nn.Embed(16, 8, name="wte")
            return wte.attend(wte(ids))

    ids = jnp.arange(6).reshape(2, 3)
    model = TiedLM()
    config = LoraConfig(r=2, target_modules=["wte"])
    params = lora_jax.inject(model.init(jax.random.key(0), ids)["params"], config,
                             jax.random.key(1))
    with pytest.warns(UserWarning, match="'wte' is adapted and also used as a tied output head"):
        lora_jax.wrap(model.apply, config)({"params": params}, ids)


def test_a_float16_layer_gets_a_finite_delta_where_merge_is_finite():
    model = nn.Dense(8, dtype=jnp.float16, param_dtype=jnp.float16)
    x = jnp.full((2, 64), 200.0, jnp.float16)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=".*", init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(1))
    params = {**params, "lora_A": jnp.full((64, 4), 8.0), "lora_B": jnp.full((4, 8), 1e-3),
              "kernel": jnp.zeros((64, 8), jnp.float16)}
    # x @ A = 102,400 per rank entry: beyond float16; the delta itself is 102.4 * 4 * 1e-3 * 16.
    wrapped = lora_jax.wrap(model.apply, config)({"params": params}, x)
    merged = model.apply({"params": lora_jax.merge(params, config)}, x)
    assert wrapped.dtype == jnp.float16 and bool(jnp.isfinite(wrapped).all())
    np.testing.assert_allclose(np.asarray(wrapped, np.float32), np.asarray(merged, np.float32),
                               rtol=2e-3)
