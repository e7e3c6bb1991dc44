"""inject: factor shapes, peft initialisation, layer selection, and its error cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_zoo import TinyLM, single_layer

import lora_jax
from lora_jax import Layout, LoraConfig

IDS = jnp.arange(10).reshape(2, 5) % 32


def _tiny(scan=False):
    model = TinyLM(scan=scan)
    return model, model.init(jax.random.key(0), IDS)["params"]


@pytest.mark.parametrize(
    "kind, a_shape, b_shape",
    [
        ("dense", (6, 4), (4, 5)),
        ("dense_general", (6, 2, 4), (4, 5, 3)),
        ("conv", (3, 2, 6, 4), (4, 5)),  # A: a conv with the base window; B: 1x1
        ("embed", (6, 4), (4, 5)),
        ("einsum", (6, 4), (4, 2, 5)),
    ],
)
def test_factor_shapes_for_every_layer_kind(kind, a_shape, b_shape):
    model, x = single_layer(kind, 6, 5)
    params = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=4, target_modules=["layer"])
    out = lora_jax.inject(params, config, jax.random.key(1), layouts=lora_jax.layouts(model, x))
    names = ("lora_embedding_A", "lora_embedding_B") if kind == "embed" else ("lora_A", "lora_B")
    assert out["layer"][names[0]].shape == a_shape
    assert out["layer"][names[1]].shape == b_shape
    assert set(params["layer"]) < set(out["layer"])  # the input tree is not modified


def test_factors_are_float32_for_a_bfloat16_base():
    model, x = single_layer("dense", 6, 5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), x)["params"]
    out = lora_jax.inject(params, LoraConfig(r=2, target_modules=["layer"]), jax.random.key(1))
    assert out["layer"]["kernel"].dtype == jnp.bfloat16
    assert out["layer"]["lora_A"].dtype == out["layer"]["lora_B"].dtype == jnp.float32


def test_default_init_follows_peft():
    fan_in, r = 512, 8
    params = {"proj": {"kernel": jnp.zeros((fan_in, 256))},
              "emb": {"embedding": jnp.zeros((1000, 64))}}
    config = LoraConfig(r=r, target_modules=["proj", "emb"])
    out = lora_jax.inject(params, config, jax.random.key(0))
    a = np.asarray(out["proj"]["lora_A"])
    bound = 1 / np.sqrt(fan_in)  # kaiming-uniform with a = sqrt(5)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound  # std of U(-b, b) is b / sqrt(3)
    assert not out["proj"]["lora_B"].any()
    assert not out["emb"]["lora_embedding_A"].any()  # embedding: A = 0, B ~ N(0, 1)
    assert abs(float(out["emb"]["lora_embedding_B"].std()) - 1.0) < 0.1


def test_gaussian_init_has_std_one_over_r():
    params = {"proj": {"kernel": jnp.zeros((512, 256))}}
    config = LoraConfig(r=4, target_modules=["proj"], init_lora_weights="gaussian")
    a = lora_jax.inject(params, config, jax.random.key(0))["proj"]["lora_A"]
    assert abs(float(a.std()) - 0.25) < 0.01


def test_rank_pattern_sets_per_module_rank():
    _, params = _tiny()
    config = LoraConfig(r=4, target_modules=["q", "v"], rank_pattern={"v": 2})
    out = lora_jax.inject(params, config, jax.random.key(0))
    assert out["h_0"]["q"]["lora_A"].shape == (8, 4)
    assert out["h_0"]["v"]["lora_A"].shape == (8, 2)


def test_scanned_stack_factors_carry_the_layer_axis():
    model, params = _tiny(scan=True)
    config = LoraConfig(r=4, target_modules=["q", "v"])
    out = lora_jax.inject(params, config, jax.random.key(0),
                          layouts=lora_jax.layouts(model, IDS))
    assert out["h"]["q"]["kernel"].shape == (3, 8, 8)
    assert out["h"]["q"]["lora_A"].shape == (3, 8, 4)
    assert out["h"]["q"]["lora_B"].shape == (3, 4, 8)


def test_layers_to_transform_unscanned_uses_the_index_in_the_path():
    _, params = _tiny()
    config = LoraConfig(r=2, target_modules=["q"], layers_to_transform=[1],
                        layers_pattern="h")
    out = lora_jax.inject(params, config, jax.random.key(0))
    assert "lora_A" in out["h_1"]["q"]
    assert "lora_A" not in out["h_0"]["q"] and "lora_A" not in out["h_2"]["q"]


def test_layers_to_transform_on_a_scanned_stack_zeroes_the_other_layers():
    model, params = _tiny(scan=True)
    config = LoraConfig(r=2, target_modules=["q"], layers_to_transform=[0, 2],
                        init_lora_weights=False)
    out = lora_jax.inject(params, config, jax.random.key(0),
                          layouts=lora_jax.layouts(model, IDS))
    a, b = out["h"]["q"]["lora_A"], out["h"]["q"]["lora_B"]
    assert not a[1].any() and not b[1].any()
    assert a[0].any() and a[2].any() and b[0].any() and b[2].any()


def test_inject_under_jit_equals_eager():
    _, params = _tiny()
    config = LoraConfig(r=2, target_modules=["q", "v", "wte"])
    eager = lora_jax.inject(params, config, jax.random.key(3))
    jitted = jax.jit(lambda p, k: lora_jax.inject(p, config, k))(params, jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)


def test_explicit_layout_for_a_stacked_kernel():
    params = {"blocks": {"proj": {"kernel": jnp.zeros((3, 6, 5))}}}
    config = LoraConfig(r=2, target_modules=["proj"])
    out = lora_jax.inject(params, config, jax.random.key(0),
                          layouts={"blocks.proj": Layout("dense", stacked=1)})
    assert out["blocks"]["proj"]["lora_A"].shape == (3, 6, 2)


# --- errors: each names the problem, and the input is left as it was ---------------------

def test_no_match_lists_paths_and_closest_names():
    _, params = _tiny()
    with pytest.raises(ValueError) as error:
        lora_jax.inject(params, LoraConfig(target_modules=["q_proj"]), jax.random.key(0))
    message = str(error.value)
    assert "target_modules=('q_proj',) matched no module" in message
    assert "h_0.q" in message and "Closest names: ['q'" in message


def test_target_modules_none_is_an_error():
    _, params = _tiny()
    with pytest.raises(ValueError, match="target_modules is None"):
        lora_jax.inject(params, LoraConfig(), jax.random.key(0))


def test_rank_larger_than_the_kernel_warns_as_peft_accepts_it():
    _, params = _tiny()
    with pytest.warns(UserWarning, match=r"r=9 for 'h_0.v' is larger than min\(fan_in, fan_out\)"
                                         r"=8 of its weight \(8, 16\)"):
        out = lora_jax.inject(params, LoraConfig(r=9, target_modules=["v"]), jax.random.key(0))
    assert out["h_0"]["v"]["lora_A"].shape == (8, 9)
    with pytest.raises(ValueError, match="needs r <= that"):
        lora_jax.inject(params, LoraConfig(r=9, target_modules=["v"], init_lora_weights="olora"),
                        jax.random.key(0))


def test_injecting_twice_is_an_error():
    _, params = _tiny()
    config = LoraConfig(r=2, target_modules=["q"])
    once = lora_jax.inject(params, config, jax.random.key(0))
    with pytest.raises(ValueError, match="'h_0.q' already has LoRA factors"):
        lora_jax.inject(once, config, jax.random.key(0))


def test_a_kernel_of_more_axes_needs_layouts():
    model, params = _tiny(scan=True)
    with pytest.raises(ValueError, match=r"kernel at 'h.q' has shape \(3, 8, 8\).*"
                                         r"layouts=lora_jax.layouts\(model"):
        lora_jax.inject(params, LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))


def test_modules_to_save_matching_nothing_is_an_error():
    _, params = _tiny()
    config = LoraConfig(r=2, target_modules=["q"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\] matched no module"):
        lora_jax.inject(params, config, jax.random.key(0))


def test_layers_to_transform_out_of_range_warns_and_adapts_the_layers_that_exist():
    model, params = _tiny(scan=True)
    layouts = lora_jax.layouts(model, IDS)
    config = LoraConfig(r=2, target_modules=["q"], layers_to_transform=[0, 5])
    with pytest.warns(UserWarning, match=r"layers_to_transform names layers \[5\] that the "
                                         r"targeted modules do not have; their layer indices "
                                         r"are \[0, 1, 2\]"):
        out = lora_jax.inject(params, config, jax.random.key(0), layouts=layouts)
    assert out["h"]["q"]["lora"].layers == (0,)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="keeps none"):
        lora_jax.inject(params, LoraConfig(r=2, target_modules=["q"], layers_to_transform=[5]),
                        jax.random.key(0), layouts=layouts)


def test_lora_only_bias_with_a_layer_selection_on_a_scanned_stack_is_an_error():
    model, params = _tiny(scan=True)
    assert "bias" in params["h"]["q"]
    config = LoraConfig(r=2, target_modules=["q"], layers_to_transform=[1], bias="lora_only")
    with pytest.raises(ValueError, match="bias='lora_only' with only some layers of the scanned "
                                         "stack 'h.q' adapted would train the biases of every"):
        lora_jax.inject(params, config, jax.random.key(0), layouts=lora_jax.layouts(model, IDS))
    # Without a bias there is nothing to train per layer: accepted.
    layouts = lora_jax.layouts(model, IDS)
    params = {**params, "h": {**params["h"], "q": {"kernel": params["h"]["q"]["kernel"]}}}
    lora_jax.inject(params, config, jax.random.key(0), layouts=layouts)


def test_all_linear_targets_dense_like_layers_but_not_the_head():
    model, params = _tiny()
    out = lora_jax.inject(params, LoraConfig(r=2, target_modules="all-linear"),
                          jax.random.key(0))
    adapted = {p for p, m in lora_jax.core.targets.iter_modules(out) if "lora_A" in m}
    assert adapted == {f"h_{i}.{n}" for i in range(3) for n in ("q", "v", "o", "mlp")}
