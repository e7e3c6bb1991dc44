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


KINDS = ("dense", "dense_general", "conv", "embed")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, False])
def test_dora_wrapped_equals_merged_and_starts_at_the_base(kind, init):
    model, x = single_layer(kind, 6, 5)
    base = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], use_dora=True,
                        init_lora_weights=init)
    params = lora_jax.inject(base, config, jax.random.key(1), layouts=lora_jax.layouts(model, x))
    wrapped = lora_jax.wrap(model.apply, config)({"params": params}, x)
    if init is True:  # m = ||W||, B = 0: the base exactly
        np.testing.assert_array_equal(wrapped, model.apply({"params": base}, x))
    merged = model.apply({"params": lora_jax.merge(params, config)}, x)
    np.testing.assert_allclose(wrapped, merged, rtol=1e-5, atol=1e-5 * np.abs(merged).max())


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
    with pytest.raises(ValueError, match=r"use_dora is not supported for 'layer' \(einsum\): as "
                                         "in peft, DoRA applies to Dense-like, Conv and Embed"):
        lora_jax.inject(params, LoraConfig(target_modules=["layer"], use_dora=True),
                        jax.random.key(1), layouts=lora_jax.layouts(model, x))
