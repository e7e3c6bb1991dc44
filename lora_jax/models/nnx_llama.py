"""Llama (HF `LlamaForCausalLM`) as a Flax NNX module with HF parameter paths.

Paths: `model.embed_tokens`, `model.layers.<i>.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}` (an `nnx.List`), `model.norm`, and
`lm_head` unless `tie_word_embeddings`. `scan_layers=True`: one `nnx.vmap` stack `model.layers`
run by `nnx.scan`. Hyperparameters, rotary embeddings and weight loading are the linen model's
(`lora_jax.models.decoder`); no KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.models import decoder as llama
from lora_jax.models.attention import attention
from lora_jax.models.decoder import apply_rotary, rotary
from lora_jax.models.nnx_stack import causal_mask, load, make_stack, run_stack

Config = llama.Config
config_from_hf = llama.config_from_hf
LAYER_STACKS = llama.LAYER_STACKS


class LlamaAttention(nnx.Module):
    def __init__(self, c: Config, kw: dict[str, Any]):
        self.heads = c.heads
        heads, kv_heads, head_dim = c.heads
        linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=c.attention_bias, **kw)
        self.q_proj = linear(c.hidden_size, heads * head_dim)
        self.k_proj = linear(c.hidden_size, kv_heads * head_dim)
        self.v_proj = linear(c.hidden_size, kv_heads * head_dim)
        self.o_proj = linear(heads * head_dim, c.hidden_size)

    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: Any) -> jax.Array:
        heads, kv_heads, head_dim = self.heads
        batch, length, _ = x.shape
        split = lambda t, n: t.reshape(batch, length, n, head_dim)
        q = apply_rotary(split(self.q_proj(x), heads), *rope)
        k = apply_rotary(split(self.k_proj(x), kv_heads), *rope)
        out = attention(q, k, split(self.v_proj(x), kv_heads), mask=mask, is_causal=True)
        return self.o_proj(out.reshape(batch, length, heads * head_dim))


class LlamaMLP(nnx.Module):
    def __init__(self, c: Config, kw: dict[str, Any]):
        linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=c.mlp_bias, **kw)
        self.gate_proj = linear(c.hidden_size, c.intermediate_size)
        self.up_proj = linear(c.hidden_size, c.intermediate_size)
        self.down_proj = linear(c.intermediate_size, c.hidden_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, c: Config, kw: dict[str, Any]):
        self.input_layernorm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(c, kw)
        self.post_attention_layernorm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(c, kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None, rope: Any) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), mask, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
    def __init__(self, c: Config, kw: dict[str, Any], scan_layers: bool, remat: bool):
        self.config, self.remat = c, remat
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, **kw)
        self.layers = make_stack(lambda r: LlamaDecoderLayer(c, {**kw, "rngs": r}),
                                 c.num_hidden_layers, kw["rngs"], scan_layers)
        self.norm = nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        rope = rotary(positions, self.config.heads[2], self.config.rope_theta)
        x = run_stack(self.layers, self.embed_tokens(input_ids), causal_mask(attention_mask),
                      rope, remat=self.remat)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Llama with its LM head: `model(input_ids, attention_mask=None) -> logits`."""

    def __init__(self, config: Config, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, scan_layers: bool = False, remat: bool = False,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.model = LlamaModel(config, kw, scan_layers, remat)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        h = self.model(input_ids, attention_mask)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)


def from_hf(state_dict: Mapping[str, Any], config: Config, *, scan_layers: bool = False,
            **kwargs: Any) -> LlamaForCausalLM:
    """The model with an HF LlamaForCausalLM state dict's weights (numpy arrays)."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, scan_layers=scan_layers,
                                                    rngs=nnx.Rngs(0), **kwargs))
    return load(model, llama.params_from_hf(state_dict, config, scan_layers=scan_layers),
                LAYER_STACKS)
