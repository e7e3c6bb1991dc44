"""The NNX frontend beyond the contract suite (tests/contract): linen's factors exactly, NNX idioms
(Optimizer, DiffState, split), nnx.List and nnx.vmap/nnx.scan stacks, the functional side on the
state's pure dict, merge back to a plain model, factor sharding metadata, peft files of the NNX
reference models and multi-axis kernels, and bad input named by NNX paths."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from contract.layers import CORE, DIM, OUT, nnx_model
from flax import nnx
from layer_zoo import single_layer

import lora_jax
import lora_jax.nnx.frontend as lnnx
from lora_jax import Layout, LoraConfig, Rule
from lora_jax.core.factors import dense_delta

RTOL = 1e-5


def _close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(np.abs(expected).max(), 1e-6)
    assert np.abs(actual - expected).max() <= rtol * scale, np.abs(actual - expected).max() / scale


# --- one core: NNX gets linen's factors ----------------------------------------------------------

# LoRA, DoRA (a magnitude per output feature; peft has no DoRA for einsum kernels) and the
# initialisations that replace the base weight by a residual (PiSSA, OLoRA; not for embeddings).
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"},
            "olora": {"init_lora_weights": "olora"}}
UNSUPPORTED = {("dora", "einsum"), ("pissa", "embed"), ("olora", "embed")}


@pytest.mark.parametrize("kind,variant", [(kind, variant) for kind in CORE for variant in VARIANTS
                                          if (variant, kind) not in UNSUPPORTED])
def test_nnx_gets_the_factors_and_outputs_of_linen(kind, variant):
    """One core: the same weights, config and key give the same factors, magnitudes, residual
    base weights and records, and the same outputs."""
    fields = {"init_lora_weights": False, **VARIANTS[variant]}
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], **fields)
    linen_model, x = single_layer(kind, DIM, OUT)
    base = linen_model.init(jax.random.key(0), x)["params"]
    model, _, _ = nnx_model(kind)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, base)  # the linen layer's weights
    nnx.update(model, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PiSSA / OLoRA: "replaced 1 base weights"
        linen = lora_jax.inject(base, config, jax.random.key(1),
                                layouts=lora_jax.layouts(linen_model, x))
        lnnx.inject(model, config, jax.random.key(1))
    linen_layer, nnx_layer = linen["layer"], lnnx.params(model)["layer"]
    assert nnx_layer.keys() == linen_layer.keys()
    for name, theirs in linen_layer.items():
        mine = nnx_layer[name]
        if isinstance(theirs, lora_jax.LoraRecord):
            assert (mine.rank, mine.scale, mine.variant, mine.layout.order, mine.layout.n_in) \
                == (theirs.rank, theirs.scale, theirs.variant, theirs.layout.order,
                    theirs.layout.n_in)
        else:
            np.testing.assert_array_equal(mine, theirs)
    _close(model(x), lora_jax.wrap(linen_model.apply, config)({"params": linen}, x))


def test_linear_general_with_unsorted_axes():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    # nnx contracts the input's axes in increasing order: in_features (3, 4)
    model = nnx.LinearGeneral((3, 4), 5, axis=(-1, -2), rngs=nnx.Rngs(0))
    config = LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    lnnx.inject(model, config, nnx.Rngs(1))
    assert model.lora_A.shape == (3, 4, 2)
    _close(model(x), lnnx.merge(model, config)(x))


def test_conv_with_causal_padding_and_dilation():
    x = jax.random.normal(jax.random.key(0), (2, 9, 4))
    model = nnx.Conv(4, 5, 3, padding="CAUSAL", kernel_dilation=2, rngs=nnx.Rngs(0))
    config = LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    lnnx.inject(model, config, nnx.Rngs(1))
    _close(model(x), lnnx.merge(model, config)(x))


# --- a tiny NNX language model: nnx.List or an nnx.vmap stack run by nnx.scan + nnx.remat --------

V, D, L = 32, 8, 3
IDS = jnp.arange(10).reshape(2, 5) % V


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.q = nnx.Linear(D, D, rngs=rngs)
        self.v = nnx.Linear(D, D, rngs=rngs)
        self.o = nnx.Linear(D, D, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        h = self.ln(x)
        h = jax.nn.softmax(self.q(h) @ h.swapaxes(-1, -2) / 4.0) @ self.v(h)
        x = x + self.o(self.drop(h))
        return x + self.mlp(jax.nn.gelu(x))


class Body(nnx.Module):
    """The blocks under `transformer.h` (peft reads a layer index after a non-leading name)."""

    def __init__(self, h):
        self.h = h


class TinyLM(nnx.Module):
    def __init__(self, rngs, scan=False):
        self.scan = scan
        self.wte = nnx.Embed(V, D, rngs=rngs)
        if scan:
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return Block(rngs)

            self.transformer = Body(create(rngs))
        else:
            self.transformer = Body(nnx.List([Block(rngs) for _ in range(L)]))
        self.lm_head = nnx.Linear(D, V, rngs=rngs)

    @property
    def h(self):
        return self.transformer.h

    def __call__(self, ids):
        x = self.wte(ids)
        if self.scan:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            @nnx.remat
            def body(x, block):
                return block(x)

            x = body(x, self.h)
        else:
            for block in self.h:
                x = block(x)
        return self.lm_head(x)


def _lm(scan=False, **fields):
    model = TinyLM(nnx.Rngs(0, dropout=1), scan=scan)
    model.eval()
    fields = {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v"], **fields}
    config = LoraConfig(**fields)
    base = model(IDS)
    lnnx.inject(model, config, nnx.Rngs(params=2, dropout=3))
    return model, config, base


def _loss(model):
    return (model(IDS) ** 2).mean()


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("scan", [False, True])
def test_the_nnx_optimizer_trains_only_the_factors_under_jit(scan, variant):
    model, config, base = _lm(scan, init_lora_weights=False, **VARIANTS[variant])
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    for path, new in jax.tree_util.tree_flatten_with_path(after)[0]:
        if str(path[-1].key).startswith("lora_"):
            assert not np.array_equal(new, flat_before[path]), path
        else:
            np.testing.assert_array_equal(new, flat_before[path])
    # Adam's state (mu, nu) exists for the factors only: 2x their bytes, plus the step count.
    factor_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(optimizer.opt_state)))
    assert opt_bytes - 4 == 2 * factor_bytes


def test_list_and_scanned_stacks_agree():
    listed, stacked = TinyLM(nnx.Rngs(0)), TinyLM(nnx.Rngs(0), scan=True)
    listed.eval(), stacked.eval()
    # the same weights, per layer (h.i.q) or stacked on the layer axis (h.q)
    weights = lnnx.params(listed)
    blocks = weights["transformer"]["h"]
    weights["transformer"]["h"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                               *[blocks[str(i)] for i in range(L)])
    state = nnx.state(stacked, nnx.Param)
    nnx.replace_by_pure_dict(state, weights)
    nnx.update(stacked, state)
    _close(stacked(IDS), listed(IDS))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False)
    lnnx.inject(listed, config, 0)
    lnnx.inject(stacked, config, 0)
    assert stacked.h.q.lora_A.shape == (L, D, 2) and listed.h[0].q.lora_A.shape == (D, 2)
    factors = lnnx.params(listed)["transformer"]["h"]
    factors = jax.tree.map(lambda *xs: jnp.stack(xs), *[factors[str(i)] for i in range(L)])
    state = nnx.state(stacked, nnx.LoRAParam)
    nnx.replace_by_pure_dict(state, {"transformer": {"h": {
        name: {f: factors[name][f] for f in ("lora_A", "lora_B")} for name in ("q", "v")}}})
    nnx.update(stacked, state)
    _close(stacked(IDS), listed(IDS))
    _close(lnnx.merge(stacked, config)(IDS), listed(IDS))


@pytest.mark.parametrize("scan", [False, True])
def test_layers_to_transform_on_a_list_and_a_scanned_stack(scan):
    model, config, _ = _lm(scan, layers_to_transform=[1], init_lora_weights=False)
    tree = lnnx.params(model)
    if scan:
        record = tree["transformer"]["h"]["q"]["lora"]
        assert record.layers == (1,) and record.layout.stacked == 1
        a = model.h.q.lora_A[...]
        assert a[1].any() and not a[0].any() and not a[2].any()
    else:
        adapted = sorted(item.target for item in lora_jax.core.record.iter_records(tree))
        assert adapted == ["transformer.h.1.q", "transformer.h.1.v"]
    # peft's count: unselected stacked layers are not trainable
    assert lnnx.count_parameters(model, config)[0] == 2 * (D * 2 + 2 * D)
    # unselected layers stay at zero through training
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    if scan:
        a = model.h.q.lora_A[...]
        assert not a[0].any() and not a[2].any() and a[1].any()


def test_peft_style_names_and_layer_indices_of_an_nnx_list():
    model, _, _ = _lm(False, target_modules=["h.2.q", "0.v"])
    adapted = sorted(item.target for item in lora_jax.core.record.iter_records(lnnx.params(model)))
    assert adapted == ["transformer.h.0.v", "transformer.h.2.q"]
    assert type(model.h[2].q).__name__ == "LinearWithLoRA"
    assert type(model.h[1].q) is nnx.Linear


def test_the_functional_side_on_the_state_dict():
    model, config, base = _lm(False, init_lora_weights=False, bias="lora_only")
    tree = nnx.to_pure_dict(nnx.state(model))
    trainable, frozen = lora_jax.split(lnnx.params(model), config)
    assert trainable["transformer"]["h"]["0"]["q"]["kernel"] is None
    assert trainable["transformer"]["h"]["0"]["q"]["bias"] is not None  # lora_only
    assert lora_jax.combine(trainable, frozen).keys() == lnnx.params(model).keys()
    n_factors = L * 2 * (D * 2 + 2 * D)
    assert lora_jax.count_parameters(lnnx.params(model), config)[0] == n_factors + L * 2 * D
    # the core's merge of the pure dict == the NNX merge's weights
    merged_tree = lora_jax.merge(lnnx.params(model), config)
    plain = lnnx.merge(model, config)
    np.testing.assert_array_equal(merged_tree["transformer"]["h"]["1"]["q"]["kernel"],
                                  plain.h[1].q.kernel[...])
    assert "lora" in tree["transformer"]["h"][0]["q"]  # nnx's own dict holds the record too
    # nnx's filter for what the config trains: factors + the adapted modules' biases
    kernel = model.h[0].q.kernel[...]
    wrt = lnnx.trainable(model, config)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)
    grads = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    assert not np.array_equal(model.h[0].q.bias[...], plain.h[0].q.bias[...])
    np.testing.assert_array_equal(model.h[0].q.kernel[...], kernel)
    mu = nnx.to_pure_dict(nnx.state(optimizer.opt_state))[0]["mu"]
    assert mu["transformer"]["h"][0]["q"].keys() == {"bias", "lora_A", "lora_B"}


def test_jax_jit_grad_and_vmap_over_adapters_with_nnx_split():
    model, config, _ = _lm(False, init_lora_weights=False)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    @jax.jit
    def loss(lora, rest):
        return _loss(nnx.merge(graphdef, lora, rest))

    grads = jax.grad(loss)(lora, rest)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)
    # two adapters over one frozen base, vmapped
    other = jax.tree.map(lambda a: a * 2.0, lora)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), lora, other)
    outs = jax.vmap(lambda one: nnx.merge(graphdef, one, rest)(IDS))(both)
    _close(outs[0], model(IDS))
    _close(outs[1], nnx.merge(graphdef, other, rest)(IDS))


def test_dropout_follows_train_and_eval():
    model, config, _ = _lm(False, init_lora_weights=False, lora_dropout=0.5,
                           target_modules=["q", "v", "o", "mlp"])
    for block in model.h:
        block.drop.deterministic = True  # the model's own dropout off: LoRA's alone
    model.eval()
    evaluated = model(IDS)
    np.testing.assert_array_equal(evaluated, model(IDS))
    model.train()
    for block in model.h:
        block.drop.deterministic = True
    first, second = model(IDS), model(IDS)
    assert not np.allclose(first, evaluated) and not np.allclose(first, second)
    jitted = nnx.jit(lambda m: m(IDS))
    assert not np.allclose(jitted(model), jitted(model))  # the stream advances under nnx.jit
    model.eval()
    np.testing.assert_array_equal(model(IDS), evaluated)


@pytest.mark.parametrize("scan", [False, True])
def test_functional_apply_is_the_model_as_a_pure_function_of_the_params(scan):
    model, config, _ = _lm(scan, init_lora_weights=False, lora_dropout=0.5)
    apply, tree = lnnx.functional(model), lnnx.params(model)
    trainable, frozen = lora_jax.split(tree, config)
    model.eval()
    np.testing.assert_array_equal(apply(tree, IDS), model(IDS))  # no key: eval mode

    @jax.jit
    def loss_and_grads(trainable, key):
        loss = lambda t: (apply(lora_jax.combine(t, frozen), IDS, dropout_key=key) ** 2).mean()
        return jax.value_and_grad(loss)(trainable)

    # without a key: the gradients of nnx.grad on the model (eval mode)
    eval_grads = jax.grad(lambda t: (apply(lora_jax.combine(t, frozen), IDS) ** 2).mean())(
        trainable)
    nnx_grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    h = "h" if scan else "h.1"
    for name in ("lora_A", "lora_B"):
        theirs = nnx_grads["transformer"]
        mine = eval_grads["transformer"]
        for part in h.split("."):
            theirs, mine = theirs[int(part) if part.isdigit() else part], mine[part]
        _close(mine["q"][name], theirs["q"][name][...])
    # with a key: dropout masks (LoRA's and the model's own) drawn from it, per call
    (first, grads), (other, _), (again, grads_again) = (
        loss_and_grads(trainable, jax.random.key(k)) for k in (0, 1, 0))
    assert first == again and first != other
    jax.tree.map(np.testing.assert_array_equal, grads, grads_again)


def test_dora_with_dropout_recomputes_the_base_on_the_dropped_input():
    """peft's DoRA under dropout: x W + (m/n - 1) (x' W) + (m/n) s (x' A) B, x' the dropped
    input, n = ||W + s A B|| per output feature."""
    model = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=".*", use_dora=True, lora_dropout=0.5,
                        init_lora_weights=False)
    lnnx.inject(model, config, nnx.Rngs(params=2, dropout=3))
    key = nnx.clone(model.lora_rngs)()  # the key the next call draws
    w, bias = model.kernel[...], model.bias[...]
    a, b, m = model.lora_A[...], model.lora_B[...], model.lora_magnitude_vector[...]
    dropped = lora_jax.core.factors.dropout(x, 0.5, key)
    ratio = m / jnp.linalg.norm(w + 2.0 * a @ b, axis=0)
    expected = x @ w + bias + (ratio - 1) * (dropped @ w) + ratio * 2.0 * ((dropped @ a) @ b)
    _close(model(x), expected)
    model.eval()
    _close(model(x), lnnx.merge(model, config)(x))


def test_dropout_in_a_scanned_stack():
    model, config, _ = _lm(True, init_lora_weights=False, lora_dropout=0.5)
    assert model.h.q.lora_rngs.key.shape == (L,)  # one stream per stacked layer
    model.eval()
    evaluated = model(IDS)
    model.train()
    model.set_attributes(nnx.Dropout, deterministic=True)
    assert not np.allclose(model(IDS), evaluated)


def test_merge_gives_a_plain_model_and_leaves_the_adapted_one():
    model, config, _ = _lm(False, init_lora_weights=False, lora_dropout=0.1)
    plain = lnnx.merge(model, config)
    assert type(plain.h[0].q) is nnx.Linear
    assert not nnx.to_pure_dict(nnx.state(plain, nnx.LoRAParam))
    assert "lora_rngs" not in vars(plain.h[0].q) and "deterministic" not in vars(plain.h[0].q)
    assert type(model.h[0].q).__name__ == "LinearWithLoRA"  # unchanged
    model.eval()
    _close(plain(IDS), model(IDS))
    with pytest.raises(ValueError, match="'transformer.h.0.q' was adapted with r=2, scale=2"):
        lnnx.merge(model, LoraConfig(r=2, lora_alpha=8, target_modules=["q"]))


# --- user rules, the materialising fallback, a call-time einsum ---------------------------------

class Proj(nnx.Module):
    """A user's layer: weight `w` stored [out, in]."""

    def __init__(self, din, dout, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (dout, din)) * 0.5)

    def __call__(self, x):
        return x @ self.w[...].T


lora_jax.register_rule(Rule(
    names=(f"{Proj.__module__}.{Proj.__qualname__}",), weight="w",
    layout=lambda module, w, args, kwargs: Layout("dense", order="oi"),
    delta=lambda module, x, a, b, args, kwargs: dense_delta(x, a, b)))


class Experts(nnx.Module):
    """A weight [experts, in, out] in a module no rule knows."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, D, D)) * 0.3)

    def __call__(self, x):
        return jnp.einsum("btd,edf->btf", x, self.w[...]) / 3


class Mixed(nnx.Module):
    """A stack of 2 user layers (nnx.vmap + nnx.scan), a rule-less weight, an nnx.Einsum."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Proj(D, D, rngs)

        self.proj = create(rngs)
        self.experts = Experts(rngs)
        self.einsum = nnx.Einsum("btd,dnh->btnh", (D, 2, D // 2), rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, proj):
            return proj(x)

        x = self.experts(body(x, self.proj))
        return self.einsum(x, einsum_str="bsd,dnh->bsnh").reshape(x.shape)


X = jax.random.normal(jax.random.key(3), (2, 3, D))


def test_a_stacked_user_rule_the_fallback_and_a_call_time_einsum():
    model = Mixed(nnx.Rngs(0))
    config = LoraConfig(r=2, target_modules=["proj", "einsum"], target_parameters=["experts.w"],
                        init_lora_weights=False)
    # the user's rule cannot tell a stacked [2, out, in] weight from the module alone
    with pytest.raises(ValueError, match=r"cannot adapt 'proj'.*lora_jax.nnx.layouts"):
        lnnx.inject(model, config, 1)
    lnnx.inject(model, config, 1, layouts=lnnx.layouts(model, X))
    assert model.proj.w_lora_A.shape == (2, D, 2) and model.proj.w_lora_B.shape == (2, 2, D)
    assert model.experts.w_lora_A.shape == (3, D, 2)
    assert model.einsum.lora.get_value().layout.order == "ioo"
    with pytest.warns(UserWarning, match="'experts.w' \\(\\(3, 8, 8\\)\\) has no layer rule"):
        out = model(X)
    _close(out, lnnx.merge(model, config)(X))
    # gradients reach the fallback's factors through W + scale * A B
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grads = nnx.grad(lambda m: (m(X) ** 2).sum(),
                         argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert np.abs(grads["experts"]["w_lora_B"][...]).sum() > 0


def test_adapter_only_orbax_checkpoint(tmp_path):
    from lora_jax.core.checkpoint import AdapterCheckpointer

    model, config, _ = _lm(False, init_lora_weights=False)
    tx = optax.adam(1e-2)
    trainable, _ = lora_jax.split(lnnx.params(model), config)
    opt_state = tx.init(trainable)
    with AdapterCheckpointer(tmp_path / "ckpt", async_save=False) as checkpointer:
        checkpointer.save(3, trainable, opt_state, config)
    other = TinyLM(nnx.Rngs(0, dropout=1))  # the same base, other factors (another key)
    other.eval()
    lnnx.inject(other, config, 99)
    assert not np.allclose(other(IDS), model(IDS))
    target = (lora_jax.split(lnnx.params(other), config)[0], opt_state)
    with AdapterCheckpointer(tmp_path / "ckpt") as checkpointer:
        restored = checkpointer.restore(target=target)
    assert restored.step == 3 and restored.config == config
    lnnx.update(other, restored.trainable)
    np.testing.assert_array_equal(other(IDS), model(IDS))


# --- sharding -------------------------------------------------------------------------------------

class Mlp(nnx.Module):
    def __init__(self, rngs, partitioned):
        init = nnx.initializers.lecun_normal()
        part = (lambda *names: nnx.with_partitioning(init, names)) if partitioned else \
            (lambda *names: init)
        self.up = nnx.Linear(D, 16, kernel_init=part("fsdp", "tensor"), rngs=rngs)
        self.down = nnx.Linear(16, D, kernel_init=part("tensor", "fsdp"), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_factors_follow_the_kernels_sharding_as_placement_and_metadata(variant):
    """The factors are placed on their kernel's mesh axes and carry them as NNX sharding
    metadata (a sharded step equals one device: the contract suite)."""
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    config = LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False,
                        **VARIANTS[variant])
    with jax.set_mesh(mesh):
        sharded = lnnx.inject(Mlp(nnx.Rngs(0), True), config, 1)
    single = lnnx.inject(Mlp(nnx.Rngs(0), False), config, 1)
    P = jax.sharding.PartitionSpec
    for layer, a_spec, b_spec in [(sharded.up, P("fsdp", None), P(None, "tensor")),
                                  (sharded.down, P("tensor", None), P(None, "fsdp"))]:
        assert layer.lora_A[...].sharding.spec == a_spec
        assert layer.lora_B[...].sharding.spec == b_spec
        assert layer.lora_A.get_metadata()["out_sharding"] == tuple(a_spec)
        if variant == "dora":  # the magnitude follows the output axis, as B does
            assert layer.lora_magnitude_vector[...].sharding.spec == P(b_spec[1])
    assert single.up.lora_A.get_metadata().get("out_sharding") is None


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_names_nnx_paths():
    model = TinyLM(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"matched no module.*'transformer\.h\.0\.q'.*"
                                         r"Closest names: \['q'"):
        lnnx.inject(model, LoraConfig(target_modules=["q_proj"]), 0)
    with pytest.raises(ValueError, match=r"layers_to_transform"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lnnx.inject(model, LoraConfig(target_modules=["q"], layers_to_transform=[5]), 0)
    assert not nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))  # nothing half-done
    lnnx.inject(model, LoraConfig(r=2, target_modules=["q"]), 0)
    with pytest.raises(ValueError, match="'transformer.h.0.q' already has LoRA factors"):
        lnnx.inject(model, LoraConfig(r=2, target_modules=["q"]), 0)


def test_unadaptable_and_ruleless_modules_are_refused_by_path():
    class Holder(nnx.Module):
        def __init__(self, rngs):
            self.batched = nnx.LinearGeneral(4, 5, batch_axis={0: 2}, rngs=rngs)
            self.raw = RawKernel(rngs)

    class RawKernel(nnx.Module):
        def __init__(self, rngs):
            self.kernel = nnx.Param(jnp.ones((4, 4)))

    model = Holder(nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot adapt 'batched': nnx.LinearGeneral with "
                                         "batch_axis"):
        lnnx.inject(model, LoraConfig(target_modules=["batched"]), 0)
    with pytest.raises(ValueError, match="'raw' is a RawKernel, which has no layer rule.*"
                                         r"target_parameters=\['raw.kernel'\]"):
        lnnx.inject(model, LoraConfig(r=2, target_modules=["raw"]), 0)
    assert type(model.raw) is RawKernel and not nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def test_linen_modules_are_unaffected():
    """Registering the NNX rules leaves the linen frontend's classes alone."""
    model, x = nn.Dense(4), jnp.ones((1, 3))
    config = LoraConfig(r=2, target_modules=".*", init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(1))
    _close(lora_jax.wrap(model.apply, config)({"params": params}, x),
           model.apply({"params": lora_jax.merge(params, config)}, x))


# --- NNX GPT-2 and Llama with HF paths: parity with transformers, peft files both ways ------------

HF_IDS = np.random.RandomState(0).randint(0, 99, (2, 10))


def _hf(arch):
    import transformers
    from peft_checks import tiny_hf

    if arch == "gpt2":
        return tiny_hf(transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
            bos_token_id=0, eos_token_id=0))
    return tiny_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def _nnx_model(arch, hf_model, scan):
    from peft_checks import state_dict

    from lora_jax.models import nnx_gpt2, nnx_llama

    module = nnx_gpt2 if arch == "gpt2" else nnx_llama
    config = module.config_from_hf(hf_model.config.to_dict())
    return module.from_hf(state_dict(hf_model), config, scan_layers=scan, remat=scan)


PEFT_CASES = [("gpt2", False, ["c_attn", "c_fc"]), ("llama", True, ["q_proj", "v_proj",
                                                                     "down_proj"])]
DORA = [False, True]


@pytest.mark.parametrize("dora", DORA)
@pytest.mark.parametrize("arch,scan,targets", PEFT_CASES)
def test_nnx_model_trained_here_loads_in_peft(arch, scan, targets, dora, tmp_path):
    import peft
    from peft_checks import TOL, max_diff, peft_logits, torch_out

    model = _nnx_model(arch, _hf(arch), scan)
    hf_logits = torch_out(_hf(arch), {"input_ids": HF_IDS})
    assert max_diff(model(HF_IDS), hf_logits) <= TOL  # the NNX model is HF's
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    lnnx.inject(model, config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: (m(HF_IDS) ** 2).mean()
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

    for _ in range(3):
        step(model, optimizer)
    lnnx.save_peft(tmp_path, model, config, model_type=arch)
    pm = peft.PeftModel.from_pretrained(_hf(arch), tmp_path).eval()
    ours = model(HF_IDS)
    assert max_diff(ours, hf_logits) > 100 * TOL  # the adapter matters
    assert max_diff(ours, peft_logits(pm, {"input_ids": HF_IDS})) <= TOL
    merged = lnnx.merge(model, config)
    assert max_diff(merged(HF_IDS), torch_out(pm.merge_and_unload(), {"input_ids": HF_IDS})) \
        <= TOL


@pytest.mark.parametrize("dora", DORA)
@pytest.mark.parametrize("arch,scan,targets", PEFT_CASES)
def test_peft_adapter_loads_onto_the_nnx_model(arch, scan, targets, dora, tmp_path):
    from peft_checks import TOL, max_diff, peft_adapter, peft_logits

    pm = peft_adapter(_hf(arch), str(tmp_path), r=4, lora_alpha=8, target_modules=targets,
                      use_dora=dora, **({"fan_in_fan_out": True} if arch == "gpt2" else {}))
    model = _nnx_model(arch, _hf(arch), scan)
    config = lnnx.load_peft(tmp_path, model, model_type=arch)
    assert config.r == 4 and config.use_dora == dora
    assert max_diff(model(HF_IDS), peft_logits(pm, {"input_ids": HF_IDS})) <= TOL


class Heads(nnx.Module):
    """Projections whose kernels have several input or output axes: an einsum [D, N, H], a
    LinearGeneral [D, N, H] and one [N, H, D] (PyTorch stores them as Linears [N*H, D] /
    [D, N*H])."""

    def __init__(self, rngs):
        self.q = nnx.Einsum("btd,dnh->btnh", (D, 2, 4), rngs=rngs)
        self.k = nnx.LinearGeneral(D, (2, 4), use_bias=False, rngs=rngs)
        self.o = nnx.LinearGeneral((2, 4), D, axis=(-2, -1), use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.o(self.q(x) + self.k(x))


def _torch_heads(model):
    """The PyTorch twin of `Heads`: Linears holding the row-major flattened kernels."""
    import torch

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(D, 8, bias=False), torch.nn.Linear(D, 8, bias=False)
            self.o = torch.nn.Linear(8, D, bias=False)

        def forward(self, x):
            return self.o(self.q(x) + self.k(x))

    twin = Twin()
    with torch.no_grad():
        for name, n_in in (("q", D), ("k", D), ("o", 8)):
            kernel = np.asarray(getattr(model, name).kernel[...]).reshape(n_in, -1)
            getattr(twin, name).weight.copy_(torch.tensor(kernel.T))
    return twin.eval()


@pytest.mark.parametrize("dora", DORA)
def test_multi_axis_kernels_read_and_write_peft_factors_as_their_flattened_linear(dora,
                                                                                tmp_path):
    import peft
    import torch
    from peft_checks import peft_adapter

    # peft has no DoRA for einsum kernels: DoRA targets the LinearGenerals.
    targets = ["k", "o"] if dora else ["q", "k", "o"]
    x = np.random.RandomState(0).randn(2, 3, D).astype(np.float32)
    torch_of = lambda m: m(torch.tensor(x)).detach().numpy()
    # peft -> NNX: the 2-D factors land in the kernels' own axes
    model = Heads(nnx.Rngs(0))
    pm = peft_adapter(_torch_heads(model), str(tmp_path / "theirs"), r=2, lora_alpha=4,
                      target_modules=targets, use_dora=dora)
    config = lnnx.load_peft(tmp_path / "theirs", model, path_map=lambda p: p)
    assert config.use_dora == dora
    assert model.k.lora_A.shape == (D, 2) and model.k.lora_B.shape == (2, 2, 4)
    assert model.o.lora_A.shape == (2, 4, 2) and model.o.lora_B.shape == (2, D)
    if dora:
        assert model.k.lora_magnitude_vector.shape == (2, 4)
    else:
        assert model.q.lora_B.shape == (2, 2, 4)
    _close(model(x), torch_of(pm))
    assert not np.allclose(model(x), torch_of(_torch_heads(model)), atol=1e-3)
    # NNX -> peft: the files hold torch's Linear factors, peft's forward and merge agree
    model = Heads(nnx.Rngs(1))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, use_dora=dora,
                        init_lora_weights=False)
    lnnx.inject(model, config, 2)
    lnnx.save_peft(tmp_path / "ours", model, config, path_map=lambda p: p)
    pm = peft.PeftModel.from_pretrained(_torch_heads(model), tmp_path / "ours").eval()
    _close(model(x), torch_of(pm))
    _close(lnnx.merge(model, config)(x), torch_of(pm.merge_and_unload()))


def test_stacked_multi_axis_kernels_in_peft_files_per_layer(tmp_path):
    """An nnx.vmap stack of [D, N, H] / [N, H, D] kernels: one peft Linear per layer, whose
    B A is that layer's kernel delta flattened; loading the files back gives the same model."""

    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return Heads(rngs)

            self.layers = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, heads):
                return x + heads(x)

            return body(x, self.layers)

    from safetensors.numpy import load_file

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "o"], init_lora_weights=False)
    model = lnnx.inject(Stack(nnx.Rngs(0)), config, 1)
    assert model.layers.q.lora_B.shape == (L, 2, 2, 4)
    lnnx.save_peft(tmp_path, model, config, stacks=["layers"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for i in range(L):
        for name, n_in in (("q", D), ("o", 8)):
            layer = getattr(model.layers, name)
            a = tensors[f"base_model.model.layers.{i}.{name}.lora_A.weight"]
            b = tensors[f"base_model.model.layers.{i}.{name}.lora_B.weight"]
            delta = np.tensordot(np.asarray(layer.lora_A[i]), np.asarray(layer.lora_B[i]), 1)
            np.testing.assert_allclose(b @ a, delta.reshape(n_in, -1).T, rtol=1e-5, atol=1e-6)
    x = jax.random.normal(jax.random.key(0), (2, 3, D))
    fresh = Stack(nnx.Rngs(0))
    lnnx.load_peft(tmp_path, fresh, stacks=["layers"])
    assert fresh.layers.o.lora_A.shape == (L, 2, 4, 2)
    _close(fresh(x), model(x))
    assert not np.allclose(Stack(nnx.Rngs(0))(x), model(x), atol=1e-3)
