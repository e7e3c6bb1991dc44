"""Misuse of the Python API that used to be silently wrong or end in an unclear error: each case
now raises a one-line ValueError naming the id, field or argument (or gives the documented
result), and the caller's arrays are left as they were."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.multi.adapters import adapter_set, select

X = jnp.ones((3, 5))


def _adapted(seed=1, **fields):
    model = nn.Dense(4)
    base = model.init(jax.random.key(0), X)["params"]
    config = lora_jax.LoraConfig(r=2, target_modules=".*", init_lora_weights=False, **fields)
    return model, lora_jax.inject(base, config, jax.random.key(seed)), config


@pytest.fixture(scope="module")
def two():
    """A set of two adapters over one Dense, and its wrapped apply."""
    model, a, config = _adapted(1)
    _, b, _ = _adapted(2)
    aset = adapter_set({"a": (a, config), "b": (b, config)})
    return aset, lora_jax.wrap(model.apply, config), model


def test_adapter_id_out_of_range_names_the_id(two):
    aset, apply, _ = two
    with pytest.raises(ValueError, match=r"adapter_ids holds 2 but .* holds 2 adapters"):
        apply({"params": aset.params}, X, adapter_ids=jnp.array([0, 2, -1]))
    with pytest.raises(ValueError, match=r"adapter_ids holds -2; ids are slots"):
        apply({"params": aset.params}, X, adapter_ids=jnp.array([0, -2, -1]))


def test_adapter_id_out_of_range_under_jit_is_the_base(two):
    """Under jit the ids are unknown while tracing: the documented result is the base alone."""
    aset, apply, model = two
    plain = lora_jax.wrap(model.apply, aset.configs[0])({"params": select(aset.params, -1)}, X)
    out = jax.jit(lambda p, ids: apply({"params": p}, X, adapter_ids=ids))(
        aset.params, jnp.array([0, 7, -5]))
    alone = apply({"params": select(aset.params, 0)}, X)
    np.testing.assert_allclose(out[0], alone[0], atol=1e-6)
    np.testing.assert_allclose(out[1:], plain[1:], atol=1e-6)
    assert not np.allclose(out[0], plain[0], atol=1e-3)


def test_select_out_of_range_names_the_index(two):
    aset, _, _ = two
    with pytest.raises(ValueError, match=r"select: index 5 is not a slot of this set of 2"):
        select(aset.params, 5)
    with pytest.raises(ValueError, match=r"index -2"):
        select(aset.params, -2)
    select(aset.params, -1)  # the base alone stays valid


@pytest.mark.parametrize("fields, name", [
    (dict(target_modules="(q_proj"), "target_modules"),
    (dict(target_modules=["q"], exclude_modules="[k"), "exclude_modules"),
    (dict(target_modules=["q"], rank_pattern={"q(": 4}), "rank_pattern"),
    (dict(target_modules=["q"], alpha_pattern={"*q": 4}), "alpha_pattern"),
    (dict(target_modules=["q"], layers_to_transform=[0], layers_pattern="h("), "layers_pattern"),
    (dict(target_modules=["q"], modules_to_save=["+head"]), "modules_to_save"),
])
def test_bad_regex_field_names_field_and_pattern(fields, name):
    pattern = fields[name] if isinstance(fields[name], str) else list(fields[name])[0]
    with pytest.raises(ValueError, match=rf"LoraConfig\.{name}: .* is not a valid regex") as err:
        lora_jax.LoraConfig(**fields)
    assert repr(pattern) in str(err.value) and "\n" not in str(err.value)


def test_wrap_given_params_instead_of_variables():
    model, params, config = _adapted()
    with pytest.raises(ValueError, match=r'pass \{"params": params\}'):
        lora_jax.wrap(model.apply, config)(params, X)


def test_safe_merge_under_jit_refuses():
    _, params, config = _adapted()
    with pytest.raises(ValueError, match=r"merge\(safe=True\) .* cannot run under jax.jit"):
        jax.jit(lambda p: lora_jax.merge(p, config, safe=True))(params)
    merged = jax.jit(lambda p: lora_jax.merge(p, config))(params)  # safe=False runs under jit
    eager = lora_jax.merge(params, config, safe=True)
    np.testing.assert_allclose(merged["kernel"], eager["kernel"])


def test_safe_merge_says_whose_nan():
    _, params, config = _adapted()
    before = np.asarray(params["kernel"]).copy()
    broken_base = {**params, "kernel": params["kernel"].at[0, 0].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"base weight 'kernel' holds NaN or inf before"):
        lora_jax.merge(broken_base, config, safe=True)
    broken_factor = {**params, "lora_A": params["lora_A"].at[0, 0].set(jnp.inf)}
    with pytest.raises(ValueError, match=r"from a finite base weight; the adapter's factors"):
        lora_jax.merge(broken_factor, config, safe=True)
    np.testing.assert_array_equal(params["kernel"], before)


def _tiny_llama(tied: bool):
    """A tiny HF Llama (seed 0) and its state dict as numpy arrays."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    return hf, {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def _ours(hf_config, sd, **changes):
    """Our scanned decoder (its config with `changes`), base params and layouts."""
    import dataclasses

    from lora_jax.models import decoder

    config = dataclasses.replace(decoder.config_from_hf(hf_config.to_dict()), **changes)
    model = decoder.build(config, scan_layers=True)
    params = decoder.params_from_hf(sd, config, scan_layers=True)
    return model, params, lora_jax.layouts(model, np.zeros((1, 4), np.int32))


@pytest.mark.parametrize("fields", [
    dict(modules_to_save=["lm_head", "embed_tokens"]),
    dict(alpha_pattern={"layers.1.self_attn.q_proj": 32}),  # per-layer scales: an array leaf
])
def test_count_parameters_equals_peft(fields):
    """peft counts a saved module's frozen original beside its trained copy, and no scale."""
    import peft

    hf, sd = _tiny_llama(tied=False)
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], **fields)
    expected = peft.get_peft_model(hf, peft.LoraConfig(**kwargs)).get_nb_trainable_parameters()
    _, params, layouts = _ours(hf.config, sd)
    lora = lora_jax.LoraConfig(**kwargs)
    adapted = lora_jax.inject(params, lora, jax.random.key(0), layouts=layouts)
    assert lora_jax.count_parameters(adapted, lora) == expected


def test_tied_lm_head_to_save_raises_with_peft_s_untied_recipe(tmp_path):
    """peft's modules_to_save=["lm_head"] on a tied Llama trains an untied copy of the head (the
    embeddings keep the frozen table). A tied head has no module here: inject says how to get
    peft's model, and built untied, peft's file gives peft's logits and trainable count; the
    total counts the head's table twice where peft counts the tied table once."""
    import torch
    from peft_checks import TOL, max_diff, peft_adapter

    hf, sd = _tiny_llama(tied=True)
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    pm = peft_adapter(hf, str(tmp_path), **kwargs)
    head = pm.base_model.model.lm_head
    assert head.modules_to_save["default"].weight is not head.original_module.weight  # untied
    trainable, total = pm.get_nb_trainable_parameters()
    lora = lora_jax.LoraConfig(**kwargs)
    _, params, layouts = _ours(hf.config, sd)
    with pytest.raises(ValueError, match=r"matched no module.*build the model with "
                                         r"tie_word_embeddings=False"):
        lora_jax.inject(params, lora, jax.random.key(0), layouts=layouts)
    model, params, layouts = _ours(hf.config, sd, tie_word_embeddings=False)
    adapted = lora_jax.inject(params, lora, jax.random.key(0), layouts=layouts)
    table = 99 * 32
    assert lora_jax.count_parameters(adapted, lora) == (trainable, total + table)
    loaded, config = lora_jax.load_peft(tmp_path, params, model_type="llama")
    ids = np.random.RandomState(0).randint(0, 99, (2, 6))
    ours = lora_jax.wrap(model.apply, config)({"params": loaded}, ids)
    with torch.no_grad():
        assert max_diff(ours, pm(torch.tensor(ids)).logits.numpy()) <= TOL
