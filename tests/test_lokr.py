"""LoKr against peft's LoKr (peft 0.21, torch Linear layers): the factor choice, shapes and
trainable counts, the forward and the merge with the same factors (float32, 1e-5), the
training-time dropouts, the inits, the adapter files peft writes for a tiny Llama and BERT,
and that the forward and its gradient form no in x out array."""

import json
import math
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.tuners.lokr import layer as peft_lokr
from peft_checks import base_params, max_diff, peft_logits, state_dict, torch_out, train
from safetensors.numpy import load_file
from test_peft_io_models import bert_hf, llama_hf

import lora_jax
from lora_jax.core.factors import Layout
from lora_jax.core.record import iter_records
from lora_jax.core.targets import peft_path
from lora_jax.models import bert, llama
from lora_jax.models.registry import architecture as arch_record
from lora_jax.variants.lokr import (
    LoKrConfig,
    dropout_masks,
    factorization,
    init_leaves,
    leaf_shapes,
    lokr_term,
    merge_delta,
)

TOL = 1e-5  # float32, layer outputs and merged weights against peft


def peft_linear(fan_in, fan_out, seed=0, **fields):
    """A torch Linear wrapped by peft's LoKr (`fields` of LoKrConfig), its factors random."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(fan_in, fan_out))
    fields.setdefault("init_weights", False)
    model = peft.get_peft_model(net, peft.LoKrConfig(target_modules=["proj"], **fields))
    return model, model.base_model.model.proj


def factors_of(layer):
    """The peft layer's LoKr factors as numpy by leaf name, transposed as our leaves hold them."""
    return {name: getattr(layer, name)["default"].detach().numpy().T.copy()
            for name in layer.adapter_layer_names if "default" in getattr(layer, name)}


# Shapes where w2 is full (r >= max(b, d) / 2) and low-rank, with and without decompose_both,
# and a decompose_factor that divides both sizes and one that does not.
CASES = [
    (48, 40, dict(r=8, alpha=4)),
    (48, 40, dict(r=2, alpha=3)),
    (48, 40, dict(r=2, alpha=3, decompose_both=True)),
    (64, 96, dict(r=1, alpha=2, decompose_both=True, decompose_factor=4)),
    (60, 36, dict(r=3, alpha=5, decompose_factor=7)),
    (37, 20, dict(r=4, alpha=8)),  # a prime input size: w1 has one column
]


@pytest.mark.parametrize("dims", [(12, 4), (16, 8), (48, 5), (100, -1), (127, -1), (3072, -1),
                                  (11008, -1), (60, 7), (64, 0), (64, -3)])
def test_factorization_is_peft_s(dims):
    assert factorization(*dims) == peft_lokr.factorization(*dims)


@pytest.mark.parametrize("fan_in,fan_out,fields", CASES + [
    (32, 16, dict(r=2, decompose_both=True)), (64, 64, dict(r=3)), (64, 64, dict(r=4)),
    (32, 64, dict(r=16, decompose_both=True, decompose_factor=2)), (18, 27, dict(r=1))])
def test_leaf_names_shapes_and_trainable_count_are_peft_s(fan_in, fan_out, fields):
    model, layer = peft_linear(fan_in, fan_out, **fields)
    theirs = {k: v.shape for k, v in factors_of(layer).items()}
    ours = leaf_shapes(fan_in, fan_out, fields["r"], fields.get("decompose_factor", -1),
                       fields.get("decompose_both", False))
    assert ours == theirs
    assert sum(math.prod(s) for s in ours.values()) == model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("fan_in,fan_out,fields", CASES)
def test_forward_and_merge_equal_peft_s(fan_in, fan_out, fields):
    model, layer = peft_linear(fan_in, fan_out, **fields)
    leaves = {k: jnp.asarray(v) for k, v in factors_of(layer).items()}
    weight = layer.base_layer.weight.detach().numpy().T.copy()  # [in, out]
    bias = layer.base_layer.bias.detach().numpy()
    x = np.random.RandomState(0).randn(3, 5, fan_in).astype(np.float32)
    scale = fields["alpha"] / fields["r"]
    assert layer.scaling["default"] == scale
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(x)).numpy()
    ours = x @ weight + bias + lokr_term(jnp.asarray(x), leaves, scale)
    delta = theirs - (x @ weight + bias)
    assert np.abs(delta).max() > 1e-2  # the adapter changes the output
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    merged = weight + merge_delta(leaves, scale, Layout("dense"), weight.shape)
    peft_merged = model.merge_and_unload().proj.weight.detach().numpy().T
    np.testing.assert_allclose(merged, peft_merged, atol=TOL, rtol=0)


def test_merge_of_a_stacked_and_a_stored_transposed_weight():
    """Stacked leaves with a scale per layer, and a weight stored [out, in] ("oi")."""
    shapes = leaf_shapes(12, 10, 2, decompose_both=True)
    leaves = init_leaves(jax.random.key(0), {k: (3, *s) for k, s in shapes.items()}, False)
    scales = jnp.array([0.5, 1.0, 2.0])
    stacked = merge_delta(leaves, scales, Layout("dense", stacked=1), (3, 12, 10))
    transposed = merge_delta(leaves, scales, Layout("dense", stacked=1, order="oi"), (3, 10, 12))
    for i in range(3):
        one = {k: v[i] for k, v in leaves.items()}
        single = merge_delta(one, scales[i], Layout("dense"), (12, 10))
        np.testing.assert_allclose(stacked[i], single, atol=1e-6)
        np.testing.assert_allclose(transposed[i], single.T, atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (4, 12))
    np.testing.assert_allclose(lokr_term(x, {k: v[2] for k, v in leaves.items()}, scales[2]),
                               x @ stacked[2], atol=1e-5)


@pytest.mark.parametrize("scaled", [False, True])
def test_training_dropouts_equal_peft_s(scaled):
    """peft draws torch.rand(1) (module kept if > module_dropout) and torch.rand(out) (feature
    kept if > rank_dropout): fed draws that give our masks, it computes our output."""
    fields = dict(r=2, alpha=3, rank_dropout=0.5, module_dropout=0.3, rank_dropout_scale=scaled)
    model, layer = peft_linear(48, 40, **fields)
    leaves = {k: jnp.asarray(v) for k, v in factors_of(layer).items()}
    base = layer.base_layer
    x = np.random.RandomState(0).randn(3, 48).astype(np.float32)
    model.train()
    kept = dropped = 0
    for seed in range(8):
        mask = np.asarray(dropout_masks(jax.random.key(seed), 40, 0.5, scaled, 0.3))
        draws = [torch.tensor([float(mask.any())]), torch.tensor((mask > 0).astype(np.float32))]
        with torch.no_grad(), mock.patch.object(torch, "rand", side_effect=draws):
            theirs = model(torch.tensor(x)).numpy()
        ours = x @ base.weight.detach().numpy().T + base.bias.detach().numpy() + \
            lokr_term(jnp.asarray(x), leaves, 1.5, jnp.asarray(mask))
        np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
        kept, dropped = kept + mask.any(), dropped + (0 < (mask > 0).sum() < 40)
    assert kept and kept < 8 and dropped  # both dropouts were exercised


def test_dropout_rates():
    masks = jax.vmap(lambda k: dropout_masks(k, 64, 0.25, False, 0.4))(
        jax.random.split(jax.random.key(0), 4000))
    on = np.asarray(masks).any(axis=1)
    assert abs(on.mean() - 0.6) < 0.03
    assert abs((np.asarray(masks)[on] == 0).mean() - 0.25) < 0.01
    scaled = np.asarray(dropout_masks(jax.random.key(3), 64, 0.25, True, 0.0))
    assert scaled.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(scaled[scaled > 0], 64 / (scaled > 0).sum(), rtol=1e-6)


@pytest.mark.parametrize("init", [True, "lycoris", False])
def test_inits_zero_what_peft_zeroes_and_draw_within_its_bounds(init):
    fields = dict(r=2, decompose_both=True, init_weights=init)
    _, layer = peft_linear(48, 40, **fields)
    theirs = factors_of(layer)
    ours = init_leaves(jax.random.key(0), leaf_shapes(48, 40, 2, decompose_both=True), init)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        mine = np.asarray(ours[name])
        bound = 1 / math.sqrt(value.shape[0])  # peft's fan_in: its second axis
        assert (np.abs(value).max() == 0) == (np.abs(mine).max() == 0), name
        assert np.abs(value).max() <= bound and np.abs(mine).max() <= bound
        if np.abs(value).max():  # a uniform draw: its spread near the bound's
            assert np.abs(mine).max() > 0.5 * bound and np.abs(value).max() > 0.5 * bound
    if init is True:  # the adapter starts as the identity
        x = jnp.ones((2, 48))
        assert float(jnp.abs(lokr_term(x, ours, 1.0)).max()) == 0.0


def test_forward_and_gradient_form_no_in_by_out_array():
    fan_in, fan_out = 96, 80
    leaves = init_leaves(jax.random.key(0), leaf_shapes(fan_in, fan_out, 2, decompose_both=True),
                         False)
    x = jax.random.normal(jax.random.key(1), (2, fan_in))
    loss = lambda p: (lokr_term(x, p, 0.5) ** 2).sum()

    def largest(jaxpr):
        sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
        subs = [largest(s) for eqn in jaxpr.eqns for s in jax.extend.core.jaxprs_in_params(
            eqn.params)]
        return max(sizes + subs)

    for jaxpr in (jax.make_jaxpr(loss)(leaves), jax.make_jaxpr(jax.grad(loss))(leaves)):
        assert largest(jaxpr.jaxpr) < fan_in * fan_out // 8
    # The check can fail: the merge forms the in x out delta.
    merge = jax.make_jaxpr(lambda p: merge_delta(p, 0.5, Layout("dense"), (fan_in, fan_out)))
    assert largest(merge(leaves).jaxpr) == fan_in * fan_out


def test_config_fields_and_defaults_are_peft_s():
    theirs = peft.LoKrConfig().to_dict()
    ours = LoKrConfig().to_dict()
    assert {k: theirs[k] for k in ours} == ours
    informational = {"peft_type", "auto_mapping", "peft_version",
                     "base_model_name_or_path", "revision", "inference_mode"}
    assert set(theirs) - set(ours) == informational
    assert hash(LoKrConfig(target_modules=["q"])) == hash(LoKrConfig(target_modules=("q",)))


@pytest.mark.parametrize("fields,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(alpha=float("nan")), "alpha must be a positive finite number"),
    (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be a positive integer"),
    (dict(rank_dropout=1.0), "rank_dropout must be in"),
    (dict(module_dropout=-0.1), "module_dropout must be in"),
    (dict(decompose_both=1), "decompose_both must be True or False"),
    (dict(decompose_factor=2.0), "decompose_factor must be an integer"),
    (dict(init_weights="gaussian"), "init_weights must be True, False or 'lycoris'"),
    (dict(layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
    (dict(target_modules=".*q", layers_to_transform=[0]), "peft ignores it there"),
])
def test_config_refuses_with_what_to_do(fields, match):
    with pytest.raises(ValueError, match=match):
        LoKrConfig(**fields)


def test_misspelled_field_names_the_closest():
    with pytest.raises(TypeError, match="did you mean 'decompose_both'"):
        LoKrConfig(decompose_bothh=True)


def _dropped(delta, full):
    """Per call (row of `delta`): whether the module was dropped, and the fraction of output
    features dropped (each feature of the term either kept as is or zero)."""
    kept = np.isclose(delta, full, atol=1e-6)
    zero = np.abs(delta) <= 1e-7
    assert (kept | zero).all()
    return ~kept.any(axis=-1), (~kept).mean(axis=-1)


def test_rank_and_module_dropout_act_while_training_in_both_frontends():
    """Training (a dropout rng / nnx train mode): each call keeps or zeroes whole output
    features of the term (rank_dropout) or the whole term (module_dropout), with peft's masks
    (`dropout_masks`, checked against peft above); evaluating: no dropout."""
    import flax.linen as nn
    from flax import nnx

    from lora_jax import nnx as lnnx

    config = LoKrConfig(r=2, alpha=3, target_modules=".*", init_weights=False,
                        rank_dropout=0.5, module_dropout=0.3)
    model, x = nn.Dense(40), jax.random.normal(jax.random.key(0), (1, 48))
    base = model.init(jax.random.key(1), x)["params"]
    params = lora_jax.inject(base, config, jax.random.key(2))
    apply = lora_jax.wrap(model.apply, config)
    full = apply({"params": params}, x) - model.apply({"params": base}, x)
    assert float(jnp.abs(full).min()) > 0  # evaluating: the whole term
    calls = jnp.concatenate([apply({"params": params}, x, rngs={"dropout": jax.random.key(k)})
                             for k in range(40)]) - model.apply({"params": base}, x)
    modules, features = _dropped(np.asarray(calls), np.asarray(full))
    assert 0.1 < modules.mean() < 0.5 and 0.35 < features[~modules].mean() < 0.65
    linear = lnnx.inject(nnx.Linear(48, 40, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
    linear.eval()
    full = linear(x) - x @ linear.kernel[...] - linear.bias[...]
    linear.train()
    calls = jnp.concatenate([linear(x) for _ in range(40)]) - x @ linear.kernel[...] - \
        linear.bias[...]
    modules, features = _dropped(np.asarray(calls), np.asarray(full))
    assert 0.1 < modules.mean() < 0.5 and 0.35 < features[~modules].mean() < 0.65


def test_a_peft_file_with_rank_and_module_dropout_loads_and_evaluates_as_peft(tmp_path):
    fields = dict(r=2, alpha=3, rank_dropout=0.2, module_dropout=0.1)
    model, layer = peft_linear(48, 40, **fields)
    base = {"proj": {"kernel": jnp.asarray(layer.base_layer.weight.detach().numpy().T),
                     "bias": jnp.asarray(layer.base_layer.bias.detach().numpy())}}
    model.save_pretrained(tmp_path)
    params, config = lora_jax.load_peft(tmp_path, base)
    assert (config.rank_dropout, config.module_dropout) == (0.2, 0.1)
    x = np.random.RandomState(0).randn(3, 48).astype(np.float32)
    ours = np.asarray(jnp.asarray(x) @ params["proj"]["kernel"] + params["proj"]["bias"]
                      + lokr_term(jnp.asarray(x), {k: params["proj"][k] for k in params["proj"]
                                                   if k.startswith("lokr_")}, 1.5))
    with torch.no_grad():
        theirs = model.eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)


def test_save_peft_refuses_gpt2_s_conv1d_weights(tmp_path):
    import flax.linen as nn

    config = LoKrConfig(r=1, target_modules=["proj"])
    params = {"proj": nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 6)))["params"]}
    params = lora_jax.inject(params, config, jax.random.key(1))
    with pytest.raises(ValueError, match="LOKR has no fan_in_fan_out.*not GPT-2's Conv1D"):
        lora_jax.save_peft(tmp_path, params, config, fan_in_fan_out=True)


def _linear_sizes(hf_model):
    return {name: (m.in_features, m.out_features) for name, m in hf_model.named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("hf,fields", [
    (llama_hf, dict(r=2, alpha=4, target_modules=["q_proj", "k_proj", "down_proj"],
                    decompose_both=True, rank_pattern={"layers.1.mlp.down_proj": 8},
                    alpha_pattern={"k_proj": 3})),
    (bert_hf, dict(r=3, alpha=6, target_modules=["query", "value", "output.dense"],
                   decompose_factor=4, modules_to_save=["classifier"])),
])
def test_peft_files_hold_our_names_shapes_and_config(tmp_path, hf, fields):
    """What peft's save_pretrained writes for a tiny Llama / BERT: one key per factor,
    `<module>.<leaf>` with our leaf names and shapes, and an adapter_config.json whose
    LoKr fields read back as our config."""
    model = hf()
    sizes = _linear_sizes(model)
    config = LoKrConfig(**fields)
    peft.get_peft_model(model, peft.LoKrConfig(**fields)).save_pretrained(tmp_path)
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        written = json.load(f)
    assert written["peft_type"] == "LOKR"
    ours = {k: v for k, v in written.items() if k in LoKrConfig().to_dict()}
    ours["target_modules"] = sorted(ours["target_modules"])
    assert LoKrConfig.from_dict(ours) == LoKrConfig(
        **{**fields, "target_modules": sorted(fields["target_modules"])})
    expected = {}
    for name, (fan_in, fan_out) in sizes.items():
        if any(name.endswith("." + t) for t in config.target_modules):
            shapes = leaf_shapes(fan_in, fan_out, config.rank(name), config.decompose_factor,
                                 config.decompose_both)
            expected.update({f"base_model.model.{name}.{k}": s[::-1] for k, s in shapes.items()})
    saved = {k: v.shape for k, v in tensors.items() if ".lokr_" in k}
    assert len(saved) >= 12 and saved == expected
    assert {k for k in tensors if ".lokr_" not in k} == (
        {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
        if "modules_to_save" in fields else set())


# --- end to end: the reference Llama and BERT, scanned and not, both frontends -----------------

IDS = np.random.RandomState(1).randint(0, 99, (2, 8))
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3])
E2E_TOL = 1e-4  # float32 logits and merged weights against peft
# Llama: w1 full (q, v, up) and low-rank (down), w2 low-rank and full (up, r=8: no rank axis).
E2E = {
    "llama": (llama, llama_hf, None, {"input_ids": IDS},
              dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                   decompose_both=True, rank_pattern={"up_proj": 8}, alpha_pattern={"v_proj": 3})),
    "bert": (bert, bert_hf, {"task": "classify"}, {"input_ids": IDS, "attention_mask": MASK},
             dict(r=3, alpha=5, target_modules=["query", "value", "intermediate.dense"],
                  decompose_factor=4)),
}


def into_peft(params, peft_model, stacks):
    """Our LoKr leaves written into the peft model's LoKr layers (transposed to peft's order):
    the oracle computes with our factors."""
    for item in iter_records(params):
        stack = next((s for s in stacks if item.path.startswith(s + ".")), None)
        if item.record.layout.stacked:
            rest = item.path[len(stack):]
            names = [(f"{stack}.{i}{rest}", i) for i in range(item.weight.shape[0])]
        else:
            names = [(peft_path(item.path), None)]
        for name, i in names:
            layer = peft_model.base_model.model.get_submodule(name)
            for leaf, value in item.leaves.items():
                value = np.asarray(value if i is None else value[i])
                getattr(layer, leaf)["default"].data.copy_(torch.tensor(value.T))


def linen_lokr(name, scan):
    """(model, base, params, config, apply) of the reference model with a LoKr adapter trained a
    few steps in JAX (`lora_jax.optimizer` on what `lora_jax.split` calls trainable)."""
    arch, hf, task, inputs, fields = E2E[name]
    model, base = base_params(arch, hf(), scan_layers=scan, build_kwargs=task, load_kwargs=task)
    config = LoKrConfig(**fields, init_weights=False)
    params = lora_jax.inject(base, config, jax.random.key(0),
                             layouts=lora_jax.layouts(model, **inputs))
    apply = lora_jax.wrap(model.apply, config)
    loss = lambda out: (out.astype(jnp.float32) ** 2).mean()
    params = train(params, config, loss, apply, inputs, steps=2)
    return model, base, params, config, apply


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("name", list(E2E))
def test_linen_model_equals_peft_with_the_same_factors(name, scan):
    arch, hf, task, inputs, fields = E2E[name]
    model, _, params, config, apply = linen_lokr(name, scan)
    peft_model = peft.get_peft_model(hf(), peft.LoKrConfig(**fields)).eval()
    into_peft(params, peft_model, arch_record(name).stacks)
    ours = apply({"params": params}, **inputs)
    assert max_diff(ours, torch_out(hf(), inputs)) > 100 * E2E_TOL  # the adapter matters
    assert max_diff(ours, peft_logits(peft_model, inputs)) <= E2E_TOL
    assert lora_jax.count_parameters(params, config)[0] == \
        peft_model.get_nb_trainable_parameters()[0]
    merged = lora_jax.merge(params, config)
    reference = arch.params_from_hf(state_dict(peft_model.merge_and_unload()), model.config,
                                    scan_layers=scan, **(task or {}))
    assert max(jax.tree.leaves(jax.tree.map(max_diff, merged, reference))) <= E2E_TOL


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_nnx_llama_equals_peft_with_the_same_factors(scan, tmp_path):
    from flax import nnx

    from lora_jax import nnx as lnnx
    from lora_jax.models import nnx_llama

    _, hf, _, inputs, fields = E2E["llama"]
    model = nnx_llama.from_hf(state_dict(hf()), nnx_llama.config_from_hf(
        hf().config.to_dict()), scan_layers=scan, remat=scan)
    config = LoKrConfig(**fields, init_weights=False)
    lnnx.inject(model, config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=lnnx.trainable(model, config))

    @nnx.jit
    def step(model, optimizer):
        loss = lambda m: (m(IDS) ** 2).mean()
        optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(
            0, lnnx.trainable(model, config)))(model))

    for _ in range(2):
        step(model, optimizer)
    params = lnnx.params(model)
    peft_model = peft.get_peft_model(hf(), peft.LoKrConfig(**fields)).eval()
    into_peft(params, peft_model, arch_record("llama").stacks)
    assert max_diff(model(IDS), peft_logits(peft_model, inputs)) <= E2E_TOL
    assert lora_jax.count_parameters(params, config)[0] == \
        peft_model.get_nb_trainable_parameters()[0]
    merged = lnnx.merge(model, config)(IDS)
    assert max_diff(merged, torch_out(peft_model.merge_and_unload(), inputs)) <= E2E_TOL
    # The NNX model's own file in peft, and peft's file back onto a fresh NNX model.
    lnnx.save_peft(tmp_path / "ours", model, config, model_type="llama")
    from_ours = peft.PeftModel.from_pretrained(hf(), tmp_path / "ours").eval()
    assert max_diff(model(IDS), peft_logits(from_ours, inputs)) <= E2E_TOL
    from_ours.save_pretrained(tmp_path / "theirs")
    fresh = nnx_llama.from_hf(state_dict(hf()), nnx_llama.config_from_hf(
        hf().config.to_dict()), scan_layers=scan, remat=scan)
    lnnx.load_peft(tmp_path / "theirs", fresh, model_type="llama")
    assert max_diff(fresh(IDS), model(IDS)) <= E2E_TOL


@pytest.mark.parametrize("name,scan", [("llama", False)] + [
    pytest.param(name, scan, marks=pytest.mark.full)
    for name, scan in [("llama", True), ("bert", False), ("bert", True)]],
    ids=["llama-unscanned", "llama-scanned", "bert-unscanned", "bert-scanned"])
def test_save_peft_loads_in_peft_and_load_peft_reads_peft_s_file(name, scan, tmp_path):
    """Our file in peft's LoKr, peft's file back (Llama: decompose_both, w1 full and low-rank,
    w2 low-rank and full; BERT: decompose_factor, no decompose_both)."""
    arch, hf, task, inputs, fields = E2E[name]
    model, base, params, config, apply = linen_lokr(name, scan)
    ours = apply({"params": params}, **inputs)
    lora_jax.save_peft(tmp_path / "ours", params, config, model_type=name)
    peft_model = peft.PeftModel.from_pretrained(hf(), tmp_path / "ours", is_trainable=True).eval()
    assert max_diff(ours, peft_logits(peft_model, inputs)) <= E2E_TOL
    peft_model.save_pretrained(tmp_path / "theirs")
    found = lora_jax.layouts(model, **inputs) if scan else None
    loaded, loaded_config = lora_jax.load_peft(tmp_path / "theirs", base, model_type=name,
                                               layouts=found)
    in_order = lambda c: c.replace(target_modules=sorted(c.target_modules))  # peft: a set
    assert in_order(loaded_config) == in_order(config)
    again = lora_jax.wrap(model.apply, loaded_config)({"params": loaded}, **inputs)
    assert max_diff(again, ours) <= E2E_TOL
    assert lora_jax.count_parameters(loaded, loaded_config)[0] == \
        peft_model.get_nb_trainable_parameters()[0]
