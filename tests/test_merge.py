"""merge: folds the deltas in float32, casts once, and checks its input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from layer_zoo import TinyLM

import lora_jax
from lora_jax import LoraConfig


def _adapted(modules, config, a, b):
    """`modules` ({name: {"kernel": ...}}) injected by `config`, with the factors set to a, b."""
    params = lora_jax.inject(modules, config, jax.random.key(0))
    return {name: {**node, "lora_A": a, "lora_B": b} for name, node in params.items()}


def test_merge_removes_factors_and_adds_the_scaled_product():
    a = jax.random.normal(jax.random.key(0), (6, 2))
    b = jax.random.normal(jax.random.key(1), (2, 5))
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["proj"])
    params = _adapted({"proj": {"kernel": jnp.ones((6, 5)), "bias": jnp.zeros(5)}}, config, a, b)
    merged = lora_jax.merge(params, config)
    assert set(merged["proj"]) == {"kernel", "bias"}
    np.testing.assert_allclose(merged["proj"]["kernel"], 1 + 3 * (a @ b), rtol=1e-6)


def test_merge_uses_per_module_alpha_and_rslora():
    a, b = jnp.ones((4, 3)), jnp.ones((3, 3))
    config = LoraConfig(r=3, lora_alpha=6, alpha_pattern={"v": 12}, use_rslora=True,
                        target_modules=["q", "v"])
    params = _adapted({"q": {"kernel": jnp.zeros((4, 3))}, "v": {"kernel": jnp.zeros((4, 3))}},
                      config, a, b)
    merged = lora_jax.merge(params, config)
    np.testing.assert_allclose(merged["q"]["kernel"], 3 * 6 / 3 ** 0.5, rtol=1e-6)
    np.testing.assert_allclose(merged["v"]["kernel"], 3 * 12 / 3 ** 0.5, rtol=1e-6)


def test_a_config_that_rescales_the_factors_is_an_error():
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q"])
    params = lora_jax.inject({"q": {"kernel": jnp.zeros((4, 3))}}, config, jax.random.key(0))
    for other in (LoraConfig(r=2, lora_alpha=8, target_modules=["q"]),
                  LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q"]),
                  LoraConfig(r=4, lora_alpha=8, target_modules=["q"])):
        with pytest.raises(ValueError, match="'q' was adapted with r=2, scale=2, but this "
                                             "LoraConfig gives"):
            lora_jax.merge(params, other)
    # Without a config the record's scale is used.
    assert set(lora_jax.merge(params)["q"]) == {"kernel"}


def test_bfloat16_kernel_is_merged_in_float32_and_cast_once():
    kernel = jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)
    a = jax.random.normal(jax.random.key(1), (64, 4)) * 1e-2
    b = jax.random.normal(jax.random.key(2), (4, 32)) * 1e-2
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["p"])
    params = _adapted({"p": {"kernel": kernel}}, config, a, b)
    merged = lora_jax.merge(params, config)["p"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    expected = (kernel.astype(jnp.float32) + a @ b).astype(jnp.bfloat16)
    np.testing.assert_array_equal(merged, expected)


def test_merged_scanned_stack_equals_the_wrapped_model():
    model = TinyLM(scan=True)
    ids = jnp.arange(10).reshape(2, 5)
    config = LoraConfig(r=2, target_modules=["q", "v", "wte"], init_lora_weights=False)
    params = lora_jax.inject(model.init(jax.random.key(0), ids)["params"], config,
                             jax.random.key(1), layouts=lora_jax.layouts(model, ids))
    merged = lora_jax.merge(params, config)
    assert merged["h"]["q"]["kernel"].shape == (3, 8, 8) and "lora_A" not in merged["h"]["q"]
    np.testing.assert_allclose(model.apply({"params": merged}, ids),
                               lora_jax.wrap(model.apply, config)({"params": params}, ids),
                               rtol=1e-5, atol=1e-5)


def test_safe_merge_raises_on_non_finite_weights():
    config = LoraConfig(r=1, target_modules=["p"])
    params = _adapted({"p": {"kernel": jnp.ones((3, 4))}}, config, jnp.full((3, 1), jnp.inf),
                      jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="merging 'p.kernel' produced NaN or inf"):
        lora_jax.merge(params, config, safe=True)
    assert not np.isfinite(lora_jax.merge(params, config)["p"]["kernel"]).all()


def test_merge_without_factors_is_an_error():
    with pytest.raises(ValueError, match="hold no LoRA factors"):
        lora_jax.merge({"p": {"kernel": jnp.ones((3, 3))}}, LoraConfig())
