"""lora_jax: purely functional LoRA for JAX and Flax.

>>> import flax.linen as nn, jax, jax.numpy as jnp, optax
>>> import lora_jax
>>> model, x = nn.Dense(8), jnp.ones((2, 16))
>>> config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=".*")
>>> params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config, jax.random.key(1))
>>> apply = lora_jax.wrap(model.apply, config)
>>> tx = lora_jax.optimizer(optax.adam(1e-2), params, config)
>>> apply({"params": params}, x).shape
(2, 8)
"""

from lora_jax import adapters, distributed, sharding
from lora_jax.checkpoint import AdapterCheckpointer
from lora_jax.config import LoraConfig
from lora_jax.convert import to_plain_lora
from lora_jax.counting import count_parameters, print_trainable_parameters
from lora_jax.factors import Layout
from lora_jax.inject import inject
from lora_jax.linen import layouts, wrap
from lora_jax.loraplus import loraplus
from lora_jax.merge import merge
from lora_jax.optimizer import optimizer
from lora_jax.partition import combine, split
from lora_jax.peft_io import load_peft, save_peft
from lora_jax.quantization import dequantize, quantize
from lora_jax.record import LoraRecord
from lora_jax.rules import Rule, register_rule
from lora_jax.sharding import lora_specs, shard_inject
from lora_jax.weighted import weighted_adapter

__all__ = [
    "AdapterCheckpointer",
    "Layout",
    "LoraConfig",
    "LoraRecord",
    "Rule",
    "adapters",
    "combine",
    "count_parameters",
    "dequantize",
    "distributed",
    "inject",
    "layouts",
    "load_peft",
    "loraplus",
    "lora_specs",
    "merge",
    "optimizer",
    "print_trainable_parameters",
    "quantize",
    "register_rule",
    "save_peft",
    "shard_inject",
    "sharding",
    "split",
    "to_plain_lora",
    "weighted_adapter",
    "wrap",
]
__version__ = "0.1.0"
