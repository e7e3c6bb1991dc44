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

from lora_jax.core import distributed, sharding
from lora_jax.core.checkpoint import AdapterCheckpointer
from lora_jax.core.config import LoraConfig
from lora_jax.core.convert import to_plain_lora
from lora_jax.core.counting import count_parameters, print_trainable_parameters
from lora_jax.core.factors import Layout
from lora_jax.core.inject import inject
from lora_jax.core.loraplus import loraplus
from lora_jax.core.merge import merge
from lora_jax.core.optimizer import optimizer
from lora_jax.core.partition import combine, split
from lora_jax.core.record import LoraRecord
from lora_jax.core.rules import Rule, register_rule
from lora_jax.core.sharding import lora_specs, shard_inject
from lora_jax.linen.frontend import layouts, wrap
from lora_jax.multi import adapters
from lora_jax.multi.weighted import weighted_adapter
from lora_jax.peft.files import load_peft, save_peft
from lora_jax.quant.quantize import dequantize, quantize
from lora_jax.variants.lokr import LoKrConfig
from lora_jax.variants.vera import VeraConfig

__all__ = ["AdapterCheckpointer", "Layout", "LoKrConfig", "LoraConfig", "LoraRecord", "Rule",
           "VeraConfig", "adapters", "combine", "count_parameters", "dequantize", "distributed",
           "inject", "layouts", "load_peft", "loraplus", "lora_specs", "merge", "optimizer",
           "print_trainable_parameters", "quantize", "register_rule", "save_peft", "shard_inject",
           "sharding", "split", "to_plain_lora", "weighted_adapter", "wrap"]
__version__ = "0.1.0"
