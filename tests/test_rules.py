"""Layer rules beyond the contract suite (tests/contract: default init, adapted == merged and
training on each shipped rule, a user rule and the fallback, plain and scanned): which calls
form the adapted weight, the fallback's warning, factor shapes, layouts, refusals, and peft
files of transformers' FlaxConv1D."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from contract.layers import DIM, RULES, Model, X
from third_party_layers import FlaxConv1D

import lora_jax
from lora_jax import LoraConfig


def _setup(kind, scan, **fields):
    model = Model(kind, scan)
    config = LoraConfig(r=2, lora_alpha=4, **RULES[kind][1], **fields)
    base = model.init(jax.random.key(0), X)["params"]
    params = lora_jax.inject(base, config, jax.random.key(1), layouts=lora_jax.layouts(model, X))
    return model, config, base, params


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
    pairs = {tuple(sorted(tuple(item.leaves[n].shape) for n in ("lora_A", "lora_B")))
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
