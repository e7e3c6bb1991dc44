"""LoRA variants against peft: DoRA (forward, merge, files both ways), PiSSA / OLoRA
initialisation and their conversion to a plain LoRA, LoRA+ learning rates. Real peft on tiny
random HF models; float32 tolerances as in peft_checks (logits 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from layer_zoo import single_layer
from peft_checks import (
    TOL,
    base_params,
    jax_to_peft,
    max_diff,
    peft_adapter,
    peft_to_jax,
    tiny_hf,
    torch_out,
)
from test_peft_io_models import IDS, MASK, bert_hf, llama_hf, token_loss

import lora_jax
from lora_jax import LoraConfig
from lora_jax.models import bert, gpt2, llama

MERGE_TOL = 1e-5  # float32 merged weights against peft's merge_and_unload


def gpt2_hf():
    import transformers

    config = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, initializer_range=0.2)
    return tiny_hf(transformers.GPT2LMHeadModel, config)


DORA_CASES = {
    "gpt2": (gpt2, gpt2_hf, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
             None, {"input_ids": IDS}),
    "llama": (llama, llama_hf, dict(r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj", "down_proj"]),
              None, {"input_ids": IDS}),
    "bert": (bert, bert_hf, dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                 modules_to_save=["classifier"]),
             "SEQ_CLS", {"input_ids": IDS, "attention_mask": MASK}),
}
SCANNED = {"gpt2": False, "llama": True, "bert": True}


@pytest.mark.parametrize("name", list(DORA_CASES))
def test_dora_peft_to_jax(tmp_path, name):
    arch, hf, fields, task, inputs = DORA_CASES[name]
    task_kwargs = {"task": "classify"} if task else None
    model, base = base_params(arch, hf(), scan_layers=SCANNED[name], build_kwargs=task_kwargs,
                              load_kwargs=task_kwargs)
    peft_model = peft_adapter(hf(), tmp_path, use_dora=True, task_type=task, **fields)
    assert max_diff(torch_out(peft_model, inputs), torch_out(hf(), inputs)) > 1e-2
    assert peft_to_jax(arch, model, base, peft_model, tmp_path, inputs, model_type=name) < TOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_jax_to_peft_logits_and_merge(tmp_path, name):
    arch, hf, fields, task, inputs = DORA_CASES[name]
    config = LoraConfig(**fields, use_dora=True, init_lora_weights=False)
    params, logits_diff, merge_diff = jax_to_peft(arch, hf, config, token_loss(IDS[:, 1:]),
                                                  inputs, tmp_path, task_type=task)
    magnitudes = [v for p, v in jax.tree_util.tree_leaves_with_path(params)
                  if p[-1].key == "lora_magnitude_vector"]
    assert magnitudes
    assert logits_diff < TOL and merge_diff < MERGE_TOL


# DoRA's wrapped == merged and default init == base, per layer kind and frontend: the contract
# suite in tests/test_nnx.py (frontend x kind x variant).


def _products(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _products(sub)
    return found


def test_dora_forward_and_gradient_form_no_in_by_out_product():
    dim, out, r = 48, 40, 2
    model, x = single_layer("dense", dim, out)
    config = LoraConfig(r=r, target_modules=["layer"], use_dora=True, init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(1))
    apply = lora_jax.wrap(model.apply, config)
    loss = lambda p: (apply({"params": p}, x) ** 2).sum()
    for jaxpr in (jax.make_jaxpr(loss)(params), jax.make_jaxpr(jax.grad(loss))(params)):
        shapes = _products(jaxpr.jaxpr)
        assert shapes and (dim, out) not in shapes
    # The check can fail: merge forms the product.
    assert (dim, out) in _products(jax.make_jaxpr(lambda p: lora_jax.merge(p, config))(
        params).jaxpr)


def test_dora_gradient_does_not_flow_through_the_norm():
    """peft detaches ||W + s A B||: the gradient of m is (x W + s (x A) B) / n summed."""
    model, x = single_layer("dense", 6, 5)
    config = LoraConfig(r=2, target_modules=["layer"], use_dora=True, init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(1))
    layer = params["layer"]
    apply = lora_jax.wrap(model.apply, config)
    grad_m = jax.grad(lambda p: apply({"params": p}, x).sum())(params)["layer"][
        "lora_magnitude_vector"]
    scale = layer["lora"].scale
    adapted = layer["kernel"] + scale * layer["lora_A"] @ layer["lora_B"]
    norm = jnp.linalg.norm(adapted, axis=0)
    np.testing.assert_allclose(grad_m, (x @ adapted).sum(0) / norm, rtol=1e-5)


@pytest.mark.parametrize("kind", ["einsum"])
def test_dora_on_a_layer_peft_does_not_support_is_an_error(kind):
    model, x = single_layer(kind, 6, 5)
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"'layer' \(einsum\): dora does not support this kind "
                                         "of layer: as in peft, DoRA applies to Dense-like, Conv "
                                         "and Embed"):
        lora_jax.inject(params, LoraConfig(target_modules=["layer"], use_dora=True),
                        jax.random.key(1), layouts=lora_jax.layouts(model, x))


def _peft_linear(init, r, alpha, seed=0, rslora=False):
    """A torch Linear wrapped by peft with `init_lora_weights=init`, and its original weight."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(12, 9))
    # A clear spectral gap, so the randomised SVD finds the same subspace.
    with torch.no_grad():
        u, _, v = torch.linalg.svd(torch.randn(9, 12), full_matrices=False)
        net.proj.weight.copy_(u @ torch.diag(torch.logspace(1, -2, 9)) @ v)
    original = net.proj.weight.detach().numpy().copy()
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha,
                                                     target_modules=["proj"],
                                                     init_lora_weights=init, use_rslora=rslora))
    return model, original


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_6", "olora"])
def test_pissa_and_olora_give_peft_residual_and_product(init):
    r, alpha = 3, 6
    peft_model, original = _peft_linear(init, r, alpha)
    layer = peft_model.base_model.model.proj
    residual = layer.base_layer.weight.detach().numpy()
    product = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy()
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=init)
    base = {"proj": {"kernel": jnp.asarray(original.T), "bias": jnp.zeros(9)}}
    with pytest.warns(UserWarning, match=f"init_lora_weights='{init}' replaced 1 base weights"):
        ours = lora_jax.inject(base, config, jax.random.key(0))["proj"]
    # Factors agree up to the sign / rotation freedom of SVD and QR: compare products.
    tol = 1e-4 if init != "pissa_niter_6" else 1e-3
    np.testing.assert_allclose(np.asarray(ours["lora_A"] @ ours["lora_B"]).T, product,
                               atol=tol * np.abs(product).max())
    np.testing.assert_allclose(np.asarray(ours["kernel"]).T, residual,
                               atol=tol * np.abs(original).max())


@pytest.mark.parametrize("rslora", [False, True])
def test_a_pissa_adapter_converts_to_a_plain_lora_of_the_original_base(tmp_path, rslora):
    model, x = single_layer("dense", 12, 9)
    base = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["layer"], init_lora_weights="pissa",
                        use_rslora=rslora)
    with pytest.warns(UserWarning):
        start = lora_jax.inject(base, config, jax.random.key(1))
    apply = lora_jax.wrap(model.apply, config)
    np.testing.assert_allclose(apply({"params": start}, x), model.apply({"params": base}, x),
                               atol=1e-5)
    trained = {**start, "layer": {**start["layer"], "lora_B": start["layer"]["lora_B"] * 1.5 + 0.1}}
    lora_jax.save_peft(tmp_path, trained, config, initial_params=start)
    loaded, loaded_config = lora_jax.load_peft(tmp_path, base)
    assert loaded_config.r == 6 and loaded_config.init_lora_weights is True
    np.testing.assert_allclose(lora_jax.wrap(model.apply, loaded_config)({"params": loaded}, x),
                               apply({"params": trained}, x), rtol=1e-4, atol=1e-4)
    # peft loads the converted file onto the untouched base too.
    net = torch.nn.Sequential()
    net.add_module("layer", torch.nn.Linear(12, 9))
    with torch.no_grad():
        net.layer.weight.copy_(torch.from_numpy(np.asarray(base["layer"]["kernel"]).T))
        net.layer.bias.copy_(torch.from_numpy(np.asarray(base["layer"]["bias"])))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(net, tmp_path)(torch.from_numpy(
            np.asarray(x))).numpy()
    np.testing.assert_allclose(theirs, apply({"params": trained}, x), rtol=1e-4, atol=1e-4)


def test_pissa_bad_input_is_refused():
    table = {"emb": {"embedding": jnp.ones((10, 4))}}
    with pytest.raises(ValueError, match="init_lora_weights='pissa' is not supported for 'emb' "
                                         r"\(embed\)"):
        lora_jax.inject(table, LoraConfig(r=2, target_modules=["emb"], init_lora_weights="pissa"),
                        jax.random.key(0))
    quantized = {"q": {"kernel": jnp.ones((8, 8), jnp.int8)}}
    with pytest.raises(ValueError, match="needs a float base weight, but 'q' is int8"):
        lora_jax.inject(quantized, LoraConfig(r=2, target_modules=["q"],
                                              init_lora_weights="olora"), jax.random.key(0))
    with pytest.raises(ValueError, match="r=9 for 'q' is larger than min"):
        lora_jax.inject({"q": {"kernel": jnp.ones((8, 8))}},
                        LoraConfig(r=9, target_modules=["q"], init_lora_weights="pissa"),
                        jax.random.key(0))
    with pytest.raises(ValueError, match="init_lora_weights must be True, False, 'gaussian', "
                                         "'pissa', 'pissa_niter_K'"):
        LoraConfig(init_lora_weights="pissa_niter_0")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_loraplus_b_moves_ratio_times_a_where_gradients_are_equal(optimizer):
    import optax

    trainable = {"q": {"kernel": None, "bias": jnp.ones(3), "lora_A": jnp.ones((3, 3)),
                       "lora_B": jnp.ones((3, 3)), "lora": None},
                 "wte": {"embedding": None, "lora_embedding_A": jnp.ones((5, 3)),
                         "lora_embedding_B": jnp.ones((3, 3))}}
    grads = jax.tree.map(lambda v: jnp.full_like(v, 0.5), trainable)
    tx = lora_jax.loraplus(getattr(optax, optimizer), 1e-3, loraplus_lr_ratio=16,
                           loraplus_lr_embedding=1e-6)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    a = updates["q"]["lora_A"]
    np.testing.assert_allclose(updates["q"]["lora_B"] / a, 16, rtol=1e-6)
    np.testing.assert_allclose(updates["q"]["bias"] / a[0], 16, rtol=1e-6)  # 1-D: group B
    np.testing.assert_allclose(updates["wte"]["lora_embedding_B"] / a, 1e-3, rtol=1e-6)
    assert updates["q"]["kernel"] is None


def test_loraplus_bad_ratio_is_refused():
    import optax

    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="loraplus_lr_ratio must be a positive finite"):
            lora_jax.loraplus(optax.sgd, 1e-3, loraplus_lr_ratio=bad)


def test_dora_parameter_counts_equal_peft():
    fields = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_model = peft.get_peft_model(llama_hf(), peft.LoraConfig(use_dora=True, **fields))
    model, base = base_params(llama, llama_hf())
    config = LoraConfig(use_dora=True, **fields)
    params = lora_jax.inject(base, config, jax.random.key(0))
    assert lora_jax.count_parameters(params, config) == peft_model.get_nb_trainable_parameters()
