"""Layer rules: one contract suite over the shipped rules for other packages' layers, a
user-registered rule and the materialising fallback, plain and in a scanned + remat stack."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from third_party_layers import DenseGeneral, FlaxConv1D, GemmaAttention, GemmaFeedForward

import lora_jax
from lora_jax import Layout, LoraConfig, Rule
from lora_jax.core.factors import dense_delta

DIM = 8


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


# kind -> (layer factory, LoraConfig fields selecting its weights)
KINDS = {
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


class MaxTextMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = DenseGeneral((2, 6), name="wi")(x)
        return DenseGeneral(DIM, axis=(-2, -1), name="wo")(jnp.tanh(hidden))


class Block(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x, _=None):
        return x + KINDS[self.kind][0]()(x), None


class Model(nn.Module):
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
CASES = [(kind, scan) for kind in KINDS for scan in (False, True)]


def _setup(kind, scan, **fields):
    model = Model(kind, scan)
    config = LoraConfig(r=2, lora_alpha=4, **KINDS[kind][1], **fields)
    base = model.init(jax.random.key(0), X)["params"]
    params = lora_jax.inject(base, config, jax.random.key(1), layouts=lora_jax.layouts(model, X))
    return model, config, base, params


@pytest.mark.parametrize("kind,scan", CASES)
def test_default_init_is_the_base_exactly(kind, scan):
    model, config, base, params = _setup(kind, scan)
    wrapped = lora_jax.wrap(model.apply, config)({"params": params}, X)
    np.testing.assert_array_equal(wrapped, model.apply({"params": base}, X))


@pytest.mark.parametrize("kind,scan", CASES)
def test_wrapped_equals_merged(kind, scan):
    model, config, base, params = _setup(kind, scan, init_lora_weights=False)
    wrapped = lora_jax.wrap(model.apply, config)({"params": params}, X)
    merged = model.apply({"params": lora_jax.merge(params, config)}, X)
    assert not np.allclose(wrapped, model.apply({"params": base}, X), atol=1e-3)
    # float32: relative 1e-5 of the output's scale
    np.testing.assert_allclose(wrapped, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())


@pytest.mark.parametrize("kind", list(KINDS))
def test_three_steps_train_only_the_factors_under_jit_scan_and_remat(kind):
    model, config, _, params = _setup(kind, True, init_lora_weights=False)
    apply = lora_jax.wrap(model.apply, config)
    trainable, frozen = lora_jax.split(params, config)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        loss = lambda t: (apply({"params": lora_jax.combine(t, frozen)}, X) ** 2).mean()
        grads = jax.grad(loss)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    start = trainable
    for _ in range(3):
        trainable, state = step(trainable, state)
    after = lora_jax.combine(trainable, frozen)
    names = {k for item in lora_jax.core.record.iter_records(after) for k in item.record.names}
    for path, old in jax.tree_util.tree_flatten_with_path(params)[0]:
        new = after
        for key in path:
            new = new[key.key]
        if path[-1].key in names:
            assert not np.array_equal(old, new), path
        else:
            np.testing.assert_array_equal(old, new)
    assert jax.tree.leaves(start)  # the factors are the trainable half


def _products(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(sorted(tuple(v.aval.shape) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _products(sub)
    return found


@pytest.mark.parametrize("kind", ["flax_conv1d", "gemma_qkv", "maxtext", "user_rule",
                                  "fallback"])
def test_only_the_fallback_forms_the_adapted_weight(kind):
    model, config, _, params = _setup(kind, False, init_lora_weights=False)
    apply = lora_jax.wrap(model.apply, config)
    loss = lambda p: (apply({"params": p}, X) ** 2).sum()
    pairs = {tuple(sorted([tuple(item.factors[0].shape), tuple(item.factors[1].shape)]))
             for item in lora_jax.core.record.iter_records(params)}
    # A @ B appears as a dot_general of a factor-shaped operand pair (batched over kept axes).
    formed = lambda jaxpr: any(tuple(shapes) in pairs for shapes in _products(jaxpr))
    with pytest.warns(UserWarning) if kind == "fallback" else _no_warning():
        forward = jax.make_jaxpr(loss)(params).jaxpr
    backward = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    assert formed(forward) == formed(backward) == (kind == "fallback")


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_the_fallback_warns_once_per_module_naming_it_and_the_cost():
    model, config, _, params = _setup("fallback", False)
    with pytest.warns(UserWarning) as caught:
        lora_jax.wrap(model.apply, config)({"params": params}, X)
    messages = sorted({str(w.message) for w in caught})
    assert len(messages) == 2  # two layers
    assert messages[0].startswith("'h_0.experts.w' ((3, 8, 8)) has no layer rule, so its "
                                  "adapted weight W + scale * A B is formed on every call")


def test_factor_shapes_follow_the_rules():
    _, _, _, conv = _setup("flax_conv1d", False)
    layer = conv["h_0"]["c_attn"]
    assert layer["kernel"].shape == (DIM, DIM) and layer["lora"].layout.order == "oi"
    _, _, _, gemma = _setup("gemma_qkv", True)
    qkv = gemma["h"]["attn"]["qkv_einsum"]  # [layers, S=3, N, D, H]
    assert qkv["w_lora_A"].shape == (2, 3, DIM, 2) and qkv["w_lora_B"].shape == (2, 3, 2, 2, 4)
    _, _, _, mlp = _setup("gemma_mlp", False)
    assert set(mlp["h_0"]["mlp"]) == {"gating_einsum", "linear", "linear_lora_A",
                                      "linear_lora_B", "linear_lora", "gating_einsum_lora_A",
                                      "gating_einsum_lora_B", "gating_einsum_lora"}
    _, _, _, experts = _setup("fallback", False)
    assert experts["h_0"]["experts"]["w_lora_A"].shape == (3, DIM, 2)  # per expert


def test_a_transposed_kernel_injected_from_the_tree_alone_is_caught_at_the_call():
    model = Model("flax_conv1d", False)
    config = LoraConfig(r=2, target_modules=["c_attn"])
    params = lora_jax.inject(model.init(jax.random.key(0), X)["params"], config,
                             jax.random.key(1))
    with pytest.raises(ValueError, match=r"'h_0.c_attn' \(FlaxConv1D\): its rule reads the "
                                         r"weight as 'oi' .* made for 'io'\. Inject with "
                                         r"layouts=lora_jax.layouts"):
        lora_jax.wrap(model.apply, config)({"params": params}, X)


def test_flax_conv1d_adapter_loads_in_peft(tmp_path):
    import peft
    import torch
    from transformers.pytorch_utils import Conv1D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(6, DIM)  # torch weight [in, out]

        def forward(self, x):
            return self.c_attn(x)

    torch.manual_seed(0)
    net = Net().eval()
    params = {"c_attn": {"kernel": jnp.asarray(net.c_attn.weight.detach().numpy().T),
                         "bias": jnp.asarray(net.c_attn.bias.detach().numpy())}}

    class Wrapper(nn.Module):
        @nn.compact
        def __call__(self, x):
            return FlaxConv1D(6, name="c_attn")(x)

    model = Wrapper()
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], init_lora_weights=False)
    params = lora_jax.inject(params, config, jax.random.key(1), layouts=lora_jax.layouts(model, X))
    lora_jax.save_peft(tmp_path, params, config, fan_in_fan_out=True)
    loaded = peft.PeftModel.from_pretrained(net, tmp_path).eval()
    with torch.no_grad():
        expected = loaded(torch.from_numpy(np.asarray(X))).numpy()
    wrapped = lora_jax.wrap(model.apply, config)({"params": params}, X)
    np.testing.assert_allclose(wrapped, expected, rtol=1e-4, atol=1e-4)
    base = {"c_attn": {"kernel": params["c_attn"]["kernel"], "bias": params["c_attn"]["bias"]}}
    assert not np.allclose(expected, model.apply({"params": base}, X), atol=1e-3)
    # And back: peft's file onto the [out, in] kernel, read through the rule's layout.
    loaded_params, loaded_config = lora_jax.load_peft(tmp_path, base,
                                                      layouts=lora_jax.layouts(model, X))
    np.testing.assert_allclose(
        lora_jax.wrap(model.apply, loaded_config)({"params": loaded_params}, X), expected,
        rtol=1e-4, atol=1e-4)


def test_an_untargeted_unadaptable_layer_never_raises_a_targeted_one_does_at_inject():
    class Convs(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)
            return nn.Conv(4, (1, 1), name="plain")(x)

    model, x = Convs(), jnp.ones((1, 5, 5, 4))
    found = lora_jax.layouts(model, x)
    params = model.init(jax.random.key(0), x)["params"]
    lora_jax.inject(params, LoraConfig(r=2, target_modules=["plain"]), jax.random.key(1),
                    layouts=found)
    with pytest.raises(ValueError, match=r"cannot adapt 'grouped': a grouped "
                                         r"\(feature_group_count=2\) or masked Conv has no "
                                         r"low-rank delta .* "
                                         "exclude it or target its weight with "
                                         "target_parameters"):
        lora_jax.inject(params, LoraConfig(r=2, target_modules=["grouped"]), jax.random.key(1),
                        layouts=found)


def test_layouts_skips_a_submodule_called_through_apply():
    class TiedHead(nn.Module):
        @nn.compact
        def __call__(self, ids):
            wte = nn.Embed(16, DIM, name="wte")
            h = wte(ids)
            head = nn.Dense(16, use_bias=False)  # called with the table as its kernel
            return head.apply({"params": {"kernel": wte.embedding.T}}, h)

    found = lora_jax.layouts(TiedHead(), jnp.ones((2, 3), jnp.int32))
    assert list(found) == ["wte"]


def test_logically_partitioned_params_keep_their_boxes():
    class Partitioned(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(6, kernel_init=init, name="proj")(x)

    model, x = Partitioned(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    adapted = lora_jax.inject(params, config, jax.random.key(1))
    assert isinstance(adapted["proj"]["kernel"], nn.LogicallyPartitioned)
    assert adapted["proj"]["lora_A"].shape == (4, 2)
    merged = lora_jax.merge(adapted, config)
    assert isinstance(merged["proj"]["kernel"], nn.LogicallyPartitioned)
    assert merged["proj"]["kernel"].names == ("embed", "mlp")
    np.testing.assert_allclose(lora_jax.wrap(model.apply, config)({"params": adapted}, x),
                               model.apply({"params": merged}, x), rtol=1e-5, atol=1e-6)


def test_all_linear_leaves_the_output_head_and_saved_modules_out():
    """peft's rule (checked differentially in test_peft_differential): "all-linear" skips the
    output head; a classifier is left out when it is in modules_to_save, as peft's
    sequence-classification task puts it."""
    params = {name: {"kernel": jnp.ones((4, 4))} for name in ("q", "classifier", "lm_head")}
    adapted = lora_jax.inject(params, LoraConfig(r=2, target_modules="all-linear"),
                              jax.random.key(0))
    assert [name for name in adapted if "lora_A" in adapted[name]] == ["q", "classifier"]
    config = LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    adapted = lora_jax.inject(params, config, jax.random.key(0))
    assert [name for name in adapted if "lora_A" in adapted[name]] == ["q"]


def test_target_parameters_with_dropout_is_an_error():
    model = Model("fallback", False)
    params = model.init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match=r"'h_0.experts.w' is adapted through target_parameters "
                                         r"\(W \+ scale \* A B\), which has no input to drop out"):
        lora_jax.inject(params, LoraConfig(target_parameters=["experts.w"], lora_dropout=0.1),
                        jax.random.key(1))


def test_einsum_roles_read_the_equation():
    from lora_jax.core.factors import einsum_roles

    assert "has an ellipsis" in einsum_roles("btd,...d->bt")[1]
    assert einsum_roles("BTD,SNDH->SBTNH")[0] == "boio"
    assert einsum_roles("...F,NFH->...NH")[0] == "oio"
    assert einsum_roles("BTNH,NHD->BTD")[0] == "iio"


def test_wrap_and_optimizer_refuse_a_config_that_rescales_the_factors():
    model, config, _, params = _setup("flax_conv1d", False)
    other = LoraConfig(r=2, lora_alpha=16, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"'h_0.c_attn' was adapted with r=2, scale=2, but this "
                                         r"LoraConfig gives r=2, scale=8"):
        lora_jax.wrap(model.apply, other)({"params": params}, X)
    with pytest.raises(ValueError, match="was adapted with r=2, scale=2"):
        lora_jax.optimizer(optax.adam(1e-3), params, other)
