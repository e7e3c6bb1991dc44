"""GPT-2 (HF `GPT2LMHeadModel`) as a Flax linen module with HF parameter paths.

Paths: `transformer.wte`, `transformer.wpe`, `transformer.h_<i>.{ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj}`, `transformer.ln_f`; the LM head is the tied `wte` (`Embed.attend`).
With `scan_layers=True` the blocks are one scanned `transformer.h`. HF's dropouts are not
modelled (the model is deterministic); LoRA dropout comes from `lora_jax.wrap`.

    config = config_from_hf(hf_model.config.to_dict())
    model = build(config)
    params = params_from_hf({k: v.numpy() for k, v in hf_model.state_dict().items()}, config)
    logits = model.apply({"params": params}, input_ids)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lora_jax.models.generate import CausalLM, DecodeInputs, cached_attention
from lora_jax.models.layers import Layer, Stacked, activation, check_task
from lora_jax.models.registry import architecture
from lora_jax.models.stacking import Converter, config_from_dict, hf_params, layer_stack, run_layers

LAYER_STACKS = architecture("gpt2").stacks
# `lora_jax.sharding.match_specs` rules for the scanned model (leading None: the layer axis) on
# a mesh with "fsdp" and "tensor" axes: Megatron-style tensor parallelism (column-parallel in,
# row-parallel out) with fsdp on the other weight axis.
SHARDING_RULES = [
    (r".*(c_attn|c_fc)\.kernel", P(None, "fsdp", "tensor")),
    (r".*c_proj\.kernel", P(None, "tensor", "fsdp")),
    (r".*(c_attn|c_fc)\.bias", P(None, "tensor")),
    (r".*wte\.embedding", P("tensor", "fsdp")),
    (r".*wpe\.embedding", P(None, "fsdp")),
]


@dataclasses.dataclass(frozen=True)
class Config:
    """GPT-2 hyperparameters (HF names)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The Config of an HF GPT-2 `config.json` dict; rejects options this model lacks."""
    config = config_from_dict(Config, hf_config, {
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "scale_attn_weights": True, "add_cross_attention": False, "tie_word_embeddings": True})
    activation(config.activation_function)
    return config


class GPT2Attention(Layer):
    """Causal self-attention with the fused `c_attn` ([q | k | v] columns) and `c_proj`."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs
                 ) -> tuple[jax.Array, Any]:
        c = self.config
        batch, length, _ = x.shape
        qkv = self.dense(3 * c.n_embd, "c_attn")(x)
        q, k, v = (t.reshape(batch, length, c.n_head, -1) for t in jnp.split(qkv, 3, axis=-1))
        out, layer_cache = cached_attention(q, k, v, layer_cache, inputs)
        return self.dense(c.n_embd, "c_proj")(out.reshape(batch, length, c.n_embd)), layer_cache


class GPT2MLP(Layer):
    """`c_proj(act(c_fc(x)))`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        h = activation(c.activation_function)(self.dense(c.n_inner or 4 * c.n_embd, "c_fc")(x))
        return self.dense(c.n_embd, "c_proj")(h)


class GPT2Block(Layer):
    """Pre-LayerNorm block; `(x, layer_cache, inputs) -> (x, layer_cache)`."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs
                 ) -> tuple[jax.Array, Any]:
        kw = self.layer_kwargs
        out, layer_cache = GPT2Attention(**kw, name="attn")(self.norm("ln_1")(x), layer_cache,
                                                            inputs)
        x = x + out
        return x + GPT2MLP(**kw, name="mlp")(self.norm("ln_2")(x)), layer_cache


class GPT2Model(Stacked):
    """Embeddings, blocks and final LayerNorm (HF `transformer`)."""

    def setup(self) -> None:
        c = self.config
        self.wte = self.embed(c.vocab_size, c.n_embd)
        self.wpe = self.embed(c.n_positions, c.n_embd)
        self.h = layer_stack(GPT2Block, self.layer_kwargs, c.n_layer, scan=self.scan_layers,
                             remat_policy=self.remat_policy)
        self.ln_f = self.norm()

    def __call__(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any
                 ) -> tuple[jax.Array, Any]:
        """Hidden states [B, T, D] after `ln_f`, and the blocks' updated caches."""
        x = self.wte(input_ids) + self.wpe(inputs.positions)
        x, caches = run_layers(self.h, x, caches, inputs)
        return self.ln_f(x), caches


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with the tied LM head; see `lora_jax.models.generate` for the cache protocol."""

    def setup(self) -> None:
        self.transformer = GPT2Model(**self.stacked_kwargs)

    def hidden(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any,
               attention_mask: jax.Array | None) -> tuple[jax.Array, Any]:
        return self.transformer(input_ids, inputs, caches)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.transformer.wte.attend(h)

    def cache_shape(self, max_length: int) -> tuple[int, int, int]:
        c = self.config
        if max_length > c.n_positions:
            raise ValueError(f"max_length {max_length} exceeds n_positions {c.n_positions}")
        return c.n_layer, c.n_head, c.n_embd // c.n_head


def build(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          scan_layers: bool = False, remat_policy: str | None = None,
          task: str = "causal_lm") -> GPT2LMHeadModel:
    """The GPT-2 LM module (`task="causal_lm"`, the only task)."""
    check_task("GPT-2", task, "causal_lm")
    return GPT2LMHeadModel(config, dtype, param_dtype, scan_layers, remat_policy)


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   scan_layers: bool = False, convert: Converter | None = None
                   ) -> dict[str, Any]:
    """Flax params from an HF GPT2LMHeadModel state dict of numpy arrays (Conv1D is [in, out])."""
    return hf_params(build(config), state_dict, LAYER_STACKS, scan_layers=scan_layers,
                     convert=convert, transpose_kernels=False,
                     ignore=r"lm_head\.weight|.*\.attn\.(masked_)?bias")
