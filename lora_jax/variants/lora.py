"""LoRA (peft's default): A `[*in, r]` and B `[r, *out]` beside the weight; the layer adds
`scale * (x A) B` to its output, and merging adds `scale * A B` to the weight."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lora_jax.core.config import LoraConfig
from lora_jax.core.factors import Layout, broadcast_scale, kernel_delta
from lora_jax.variants import register_variant
from lora_jax.variants.base import Leaf, Variant
from lora_jax.variants.inits import initialise, pad_ranks


class Lora(Variant):
    """Plain LoRA: `W + scale * A B`, never formed in the forward."""

    name = "lora"
    config = LoraConfig
    leaves: ClassVar[tuple[Leaf, ...]] = (
        Leaf("lora_A", "ir", embed_name="lora_embedding_A", peft=".lora_A.weight",
             peft_embed=".lora_embedding_A"),
        Leaf("lora_B", "ro", embed_name="lora_embedding_B", peft=".lora_B.weight",
             peft_embed=".lora_embedding_B"))

    # peft 0.21.2 `LoraConfig().to_dict()` with save_pretrained's `inference_mode: true`.
    peft_defaults = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8,
        "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None,
        "qalora_group_size": 16, "r": 8, "rank_pattern": {}, "revision": None,
        "target_modules": None, "target_parameters": None, "task_type": None,
        "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None}
    peft_fields = ("r", "lora_alpha", "target_modules", "exclude_modules", "lora_dropout", "bias",
                   "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                   "layers_pattern", "init_lora_weights", "modules_to_save", "use_dora",
                   "target_parameters", "task_type")
    peft_informational = ("megatron_core", "qalora_group_size", "ensure_weight_tying",
                          "eva_config", "corda_config", "lora_ga_config", "loftq_config")
    # init_lora_weights values whose adapters were trained against unmodified base weights.
    peft_values = {"init_lora_weights": (
        {True: True, False: False, "gaussian": "gaussian", "eva": True, "orthogonal": True},
        "trains against modified base weights, so the adapter does not apply to the original "
        "model; convert it with peft's save_pretrained(path_initial_model_for_weight_conversion"
        "=...) first")}

    def accepts(self, config: Any) -> bool:
        return isinstance(config, LoraConfig) and not config.use_dora

    def init(self, weight: Any, layout: Layout, config: Any, values: Any, key: jax.Array,
             dtype: jnp.dtype, shared: Any = None) -> tuple[dict[str, jax.Array], Any]:
        a, b, residual = initialise(weight, layout, values.rank, values.scale, config, key, dtype)
        if values.ranks:
            a, b = pad_ranks(a, b, values.ranks, layout, config.init_lora_weights)
        return {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)}, residual

    def forward(self, call: Any, leaves: Mapping[str, jax.Array], scale: Any) -> jax.Array:
        return call.product(leaves["lora_A"], leaves["lora_B"], scale)

    def merge(self, weight: jax.Array, leaves: Mapping[str, jax.Array], scale: Any,
              layout: Layout) -> jax.Array:
        b = leaves["lora_B"]
        return weight + kernel_delta(leaves["lora_A"], b * broadcast_scale(scale, b.ndim),
                                     layout, weight.shape)


register_variant(Lora())
