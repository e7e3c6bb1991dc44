"""count_parameters and peft's print line."""

import jax
import jax.numpy as jnp
from layer_zoo import TinyLM

import lora_jax
from lora_jax import LoraConfig

IDS = jnp.arange(10).reshape(2, 5)


def test_counts_by_hand():
    params = {"q": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}}
    config = LoraConfig(r=2, target_modules=["q"], bias="lora_only")
    params = lora_jax.inject(params, config, jax.random.key(0))
    assert lora_jax.count_parameters(params, config) == (8 * 2 + 2 * 8 + 8, 64 + 8 + 32)


def test_scanned_and_unrolled_counts_agree_with_layer_selection():
    config = LoraConfig(r=2, target_modules=["q"], layers_to_transform=[0, 2])
    plain_model, scanned_model = TinyLM(), TinyLM(scan=True)
    # Under a parent module, as in real models: peft reads no layer index from a top-level list.
    plain = lora_jax.inject({"model": plain_model.init(jax.random.key(0), IDS)["params"]},
                            config, jax.random.key(1))
    layouts = {f"model.{k}": v for k, v in lora_jax.layouts(scanned_model, IDS).items()}
    scanned = lora_jax.inject({"model": scanned_model.init(jax.random.key(0), IDS)["params"]},
                              config, jax.random.key(1), layouts=layouts)
    per_layer = 8 * 2 + 2 * 8
    assert lora_jax.count_parameters(plain, config)[0] == 2 * per_layer
    assert lora_jax.count_parameters(scanned, config) == lora_jax.count_parameters(plain, config)


def test_print_line_has_peft_format(capsys):
    params = {"q": {"kernel": jnp.ones((8, 8))}}
    config = LoraConfig(r=2, target_modules=["q"])
    lora_jax.print_trainable_parameters(lora_jax.inject(params, config, jax.random.key(0)),
                                        config)
    assert capsys.readouterr().out == (
        "trainable params: 32 || all params: 96 || trainable%: 33.3333\n")
