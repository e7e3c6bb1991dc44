"""BLOOM (HF `BloomForCausalLM`) as a Flax linen module with HF parameter paths.

ALiBi attention biases instead of position embeddings, a LayerNorm after the word embeddings,
and a fused `query_key_value` whose output columns interleave heads as HF does ([q, k, v] per
head), so LoRA factors line up with peft's. Paths: `transformer.word_embeddings`,
`transformer.word_embeddings_layernorm`, `transformer.h_<i>.{input_layernorm,
self_attention.{query_key_value, dense}, post_attention_layernorm, mlp.{dense_h_to_4h,
dense_4h_to_h}}`, `transformer.ln_f`; the LM head is the tied `word_embeddings`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.generate import CausalLM, DecodeInputs, cached_attention
from lora_jax.models.layers import Layer, Stacked, check_task
from lora_jax.models.registry import architecture
from lora_jax.models.stacking import Converter, config_from_dict, hf_params, layer_stack, run_layers

LAYER_STACKS = architecture("bloom").stacks


@dataclasses.dataclass(frozen=True)
class Config:
    """BLOOM hyperparameters (HF names)."""

    vocab_size: int = 250880
    hidden_size: int = 64
    n_layer: int = 2
    n_head: int = 8
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The Config of an HF BLOOM `config.json` dict (`num_hidden_layers` / `num_attention_heads`
    are accepted for `n_layer` / `n_head`)."""
    aliases = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
    hf_config = {aliases.get(k, k): v for k, v in hf_config.items()}
    return config_from_dict(Config, hf_config, {"pretraining_tp": 1, "slow_but_exact": False,
                                                "tie_word_embeddings": True})


def alibi_slopes(n_heads: int) -> jax.Array:
    """Per-head ALiBi slopes, as HF's `build_alibi_tensor` (also for non-powers of two)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = base ** jnp.arange(1, closest + 1, dtype=jnp.float32)
    if closest != n_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        extra = jnp.arange(1, 1 + 2 * min(closest, n_heads - closest), 2, dtype=jnp.float32)
        slopes = jnp.concatenate([slopes, extra_base ** extra])
    return slopes


def alibi_bias(key_mask: jax.Array, n_heads: int) -> jax.Array:
    """ALiBi bias [B, N, 1, S]: slope * key position, positions counting only real (mask = 1)
    keys, as HF does; adding it per query row equals HF's relative form up to softmax shift."""
    key_mask = key_mask.astype(jnp.float32)
    positions = (jnp.cumsum(key_mask, axis=-1) - 1) * key_mask  # [B, S]
    return alibi_slopes(n_heads)[None, :, None, None] * positions[:, None, None, :]


class BloomAttention(Layer):
    """Self-attention with the fused, head-interleaved `query_key_value` and ALiBi."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs,
                 alibi: jax.Array) -> tuple[jax.Array, Any]:
        c = self.config
        batch, length, _ = x.shape
        qkv = self.dense(3 * c.hidden_size, "query_key_value")(x)
        qkv = qkv.reshape(batch, length, c.n_head, 3, c.hidden_size // c.n_head)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        out, layer_cache = cached_attention(q, k, v, layer_cache, inputs,
                                            bias=alibi.astype(q.dtype))
        return self.dense(c.hidden_size, "dense")(out.reshape(batch, length, -1)), layer_cache


class BloomMLP(Layer):
    """`dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dense(4 * self.config.hidden_size, "dense_h_to_4h")(x)
        return self.dense(self.config.hidden_size, "dense_4h_to_h")(
            jax.nn.gelu(h, approximate=True))


class BloomBlock(Layer):
    """Pre-LayerNorm block; `(x, layer_cache, inputs, alibi) -> (x, layer_cache)`."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs,
                 alibi: jax.Array) -> tuple[jax.Array, Any]:
        kw = self.layer_kwargs
        post_ln = self.config.apply_residual_connection_post_layernorm
        h = self.norm("input_layernorm")(x)
        out, layer_cache = BloomAttention(**kw, name="self_attention")(h, layer_cache, inputs,
                                                                      alibi)
        x = (h if post_ln else x) + out
        h = self.norm("post_attention_layernorm")(x)
        return (h if post_ln else x) + BloomMLP(**kw, name="mlp")(h), layer_cache


class BloomModel(Stacked):
    """Embeddings (+ LayerNorm), blocks and final LayerNorm (HF `transformer`)."""

    def setup(self) -> None:
        c = self.config
        self.word_embeddings = self.embed(c.vocab_size, c.hidden_size)
        self.word_embeddings_layernorm = self.norm()
        self.h = layer_stack(BloomBlock, self.layer_kwargs, c.n_layer, scan=self.scan_layers,
                             remat_policy=self.remat_policy, num_broadcast=2)
        self.ln_f = self.norm()

    def __call__(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any,
                 key_mask: jax.Array) -> tuple[jax.Array, Any]:
        """Hidden states [B, T, D] after `ln_f`, and the blocks' updated caches."""
        alibi = alibi_bias(key_mask, self.config.n_head)
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        x, caches = run_layers(self.h, x, caches, inputs, alibi)
        return self.ln_f(x), caches


class BloomForCausalLM(CausalLM):
    """BLOOM with the tied LM head; see `lora_jax.models.generate` for the cache protocol.
    ALiBi positions come from `attention_mask`, as in HF; `position_ids` is accepted (for
    `generate`) and unused."""

    def setup(self) -> None:
        self.transformer = BloomModel(**self.stacked_kwargs)

    def hidden(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any,
               attention_mask: jax.Array | None) -> tuple[jax.Array, Any]:
        if attention_mask is None:
            slots = input_ids.shape[1] if caches is None else caches[0].shape[2]
            attention_mask = jnp.ones((input_ids.shape[0], slots), jnp.int32)
        return self.transformer(input_ids, inputs, caches, attention_mask)

    def logits(self, h: jax.Array) -> jax.Array:
        return self.transformer.word_embeddings.attend(h)

    def cache_shape(self, max_length: int) -> tuple[int, int, int]:
        c = self.config
        return c.n_layer, c.n_head, c.hidden_size // c.n_head


def build(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          scan_layers: bool = False, remat_policy: str | None = None,
          task: str = "causal_lm") -> BloomForCausalLM:
    """The BLOOM LM module (`task="causal_lm"`, the only task)."""
    check_task("BLOOM", task, "causal_lm")
    return BloomForCausalLM(config, dtype, param_dtype, scan_layers, remat_policy)


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   scan_layers: bool = False, convert: Converter | None = None
                   ) -> dict[str, Any]:
    """Flax params from an HF BloomForCausalLM state dict of numpy arrays (torch Linear weights
    transposed; `query_key_value` keeps HF's head-interleaved column order)."""
    return hf_params(build(config), state_dict, LAYER_STACKS, scan_layers=scan_layers,
                     convert=convert, ignore=r"lm_head\.weight")
