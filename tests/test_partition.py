"""split / combine: which leaves train, round trips, and errors that name the path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax
from lora_jax import LoraConfig


def _params():
    # What trains is read from the records (as inject puts them beside the factors).
    return {
        "h_0": {"attn": {"kernel": jnp.ones((4, 6)), "bias": jnp.ones(6),
                         "lora_A": jnp.ones((4, 2)), "lora_B": jnp.zeros((2, 6)),
                         "lora": lora_jax.LoraRecord("kernel", lora_jax.Layout("dense"), 2, 1.0)},
                "ln": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
        "classifier": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
                       "out": {"kernel": jnp.ones((4, 3))}},
    }


def _trainable_paths(config):
    trainable, _ = lora_jax.split(_params(), config)
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}


def test_only_factors_train_by_default():
    assert _trainable_paths(LoraConfig()) == {"['h_0']['attn']['lora_A']",
                                              "['h_0']['attn']['lora_B']"}


def test_bias_all_and_lora_only():
    assert _trainable_paths(LoraConfig(bias="all")) == {
        "['h_0']['attn']['lora_A']", "['h_0']['attn']['lora_B']", "['h_0']['attn']['bias']",
        "['h_0']['ln']['bias']", "['classifier']['dense']['bias']"}
    assert _trainable_paths(LoraConfig(bias="lora_only")) == {
        "['h_0']['attn']['lora_A']", "['h_0']['attn']['lora_B']", "['h_0']['attn']['bias']"}


def test_modules_to_save_trains_the_whole_module():
    assert _trainable_paths(LoraConfig(modules_to_save=["classifier"])) == {
        "['h_0']['attn']['lora_A']", "['h_0']['attn']['lora_B']",
        "['classifier']['dense']['kernel']", "['classifier']['dense']['bias']",
        "['classifier']['out']['kernel']"}


def test_parts_have_the_whole_structure_with_none_holes():
    trainable, frozen = lora_jax.split(_params(), LoraConfig())
    assert trainable["h_0"]["attn"]["kernel"] is None
    assert frozen["h_0"]["attn"]["lora_A"] is None
    assert set(trainable) == set(frozen) == {"h_0", "classifier"}


@settings(max_examples=examples(40), deadline=None)
@given(bias=st.sampled_from(["none", "all", "lora_only"]),
       save=st.sampled_from([None, ["classifier"], ["out"]]))
def test_combine_inverts_split(bias, save):
    params = _params()
    config = LoraConfig(bias=bias, modules_to_save=save)
    again = lora_jax.combine(*lora_jax.split(params, config))
    assert jax.tree.structure(again) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_split_and_combine_under_jit():
    config = LoraConfig(bias="all")
    round_trip = jax.jit(lambda p: lora_jax.combine(*lora_jax.split(p, config)))
    jax.tree.map(np.testing.assert_array_equal, round_trip(_params()), _params())


def test_combine_names_the_path_where_structures_differ():
    trainable, frozen = lora_jax.split(_params(), LoraConfig())
    del frozen["h_0"]["ln"]
    with pytest.raises(ValueError, match=r"differ at 'h_0': keys \['ln'\]"):
        lora_jax.combine(trainable, frozen)


def test_combine_names_a_leaf_held_twice():
    params = _params()
    with pytest.raises(ValueError, match="more than one tree holds a value at 'h_0.attn.kernel'"):
        lora_jax.combine(params, params)
