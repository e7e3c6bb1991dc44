"""Llama (HF `LlamaForCausalLM`) as a Flax linen module with HF parameter paths.

RMSNorm, rotary position embeddings (HF's `rotate_half` convention), grouped-query attention and
a SwiGLU MLP. Paths: `model.embed_tokens`, `model.layers_<i>.{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`,
and `lm_head` unless `tie_word_embeddings` (then the head is `embed_tokens.attend`). SmolLM2 is
a Llama; `lora_jax.models.gguf` loads it from GGUF.

    config = config_from_hf(hf_model.config.to_dict())
    model = build(config, scan_layers=True, remat_policy="nothing_saveable")
    params = params_from_hf(state_dict, config, scan_layers=True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lora_jax.models.generate import (
    DecodeInputs,
    KVCache,
    advance,
    cached_attention,
    decode_inputs,
    layer_caches,
)
from lora_jax.models.layers import Layer, check_task
from lora_jax.models.registry import architecture
from lora_jax.models.stacking import (
    Converter,
    config_from_dict,
    layer_stack,
    load_hf_weights,
    run_layers,
    stack_layers,
)

LAYER_STACKS = architecture("llama").stacks
# `lora_jax.sharding.match_specs` rules for the scanned model (leading None: the layer axis) on
# a mesh with "fsdp" and "tensor" axes: Megatron-style tensor parallelism (column-parallel in,
# row-parallel out) with fsdp on the other weight axis.
SHARDING_RULES = [
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel", P(None, "fsdp", "tensor")),
    (r".*(o_proj|down_proj)\.kernel", P(None, "tensor", "fsdp")),
    (r".*embed_tokens\.embedding", P("tensor", "fsdp")),
    (r"lm_head\.kernel", P("fsdp", "tensor")),
]


@dataclasses.dataclass(frozen=True)
class Config:
    """Llama hyperparameters (HF names); `head_dim` None = hidden_size // num_attention_heads,
    `num_key_value_heads` None = num_attention_heads."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def heads(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        return (self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads,
                self.head_dim or self.hidden_size // self.num_attention_heads)


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The Config of an HF Llama `config.json` dict (transformers 4 `rope_theta` or 5
    `rope_parameters`); rejects rope scaling and activations other than SiLU."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not implemented (only 'default')")
    hf_config = {**hf_config, "rope_theta": rope.get("rope_theta",
                                                     hf_config.get("rope_theta", 10000.0))}
    return config_from_dict(Config, hf_config, {"hidden_act": "silu", "pretraining_tp": 1})


def rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, head_dim] for `apply_rotary` (frequencies repeated, as HF does)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (HF's convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


class _Layer(Layer):
    norm_cls: ClassVar[type[nn.Module]] = nn.RMSNorm
    norm_eps: ClassVar[str] = "rms_norm_eps"


class LlamaAttention(_Layer):
    """Grouped-query attention with rotary embeddings on q and k."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs,
                 rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, Any]:
        c = self.config
        heads, kv_heads, head_dim = c.heads
        batch, length, _ = x.shape
        proj = lambda name, n: self.dense(n * head_dim, name, c.attention_bias)(x).reshape(
            batch, length, n, head_dim)
        q = apply_rotary(proj("q_proj", heads), *rope)
        k = apply_rotary(proj("k_proj", kv_heads), *rope)
        out, layer_cache = cached_attention(q, k, proj("v_proj", kv_heads), layer_cache, inputs)
        out = out.reshape(batch, length, heads * head_dim)
        return self.dense(c.hidden_size, "o_proj", c.attention_bias)(out), layer_cache


class LlamaMLP(_Layer):
    """SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = self.dense(c.intermediate_size, "gate_proj", c.mlp_bias)(x)
        up = self.dense(c.intermediate_size, "up_proj", c.mlp_bias)(x)
        return self.dense(c.hidden_size, "down_proj", c.mlp_bias)(jax.nn.silu(gate) * up)


class LlamaDecoderLayer(_Layer):
    """Pre-RMSNorm block; `(x, layer_cache, inputs, rope) -> (x, layer_cache)`."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs,
                 rope: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, Any]:
        kw = self.layer_kwargs
        out, layer_cache = LlamaAttention(**kw, name="self_attn")(
            self.norm("input_layernorm")(x), layer_cache, inputs, rope)
        x = x + out
        return x + LlamaMLP(**kw, name="mlp")(self.norm("post_attention_layernorm")(x)), \
            layer_cache


class LlamaModel(_Layer):
    """Embeddings, decoder layers and the final norm (HF `model`)."""

    scan_layers: bool = False
    remat_policy: str | None = None

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = self.embed(c.vocab_size, c.hidden_size)
        self.layers = layer_stack(LlamaDecoderLayer, self.layer_kwargs, c.num_hidden_layers,
                                  scan=self.scan_layers, remat_policy=self.remat_policy,
                                  num_broadcast=2)
        self.norm = self.norm()  # the final RMSNorm (HF `model.norm`) replaces the factory

    def __call__(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any
                 ) -> tuple[jax.Array, Any]:
        """Hidden states [B, T, D] after the final norm, and the layers' updated caches."""
        _, _, head_dim = self.config.heads
        rope = rotary(inputs.positions, head_dim, self.config.rope_theta)
        x, caches = run_layers(self.layers, self.embed_tokens(input_ids), caches, inputs, rope)
        return self.norm(x), caches


class LlamaForCausalLM(_Layer):
    """Llama with its LM head; see `lora_jax.models.generate` for the cache protocol."""

    scan_layers: bool = False
    remat_policy: str | None = None

    def setup(self) -> None:
        self.model = LlamaModel(self.config, self.dtype, self.param_dtype, self.scan_layers,
                                self.remat_policy)
        if not self.config.tie_word_embeddings:
            self.lm_head = self.dense(self.config.vocab_size, use_bias=False)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, cache: KVCache | None = None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [B, T, V]; with a `cache`, `(logits, updated cache)`."""
        inputs = decode_inputs(input_ids, attention_mask, position_ids, cache)
        h, new = self.model(input_ids, inputs, layer_caches(cache))
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits if cache is None else (logits, advance(cache, new, input_ids.shape[1]))

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_length` tokens."""
        _, kv_heads, head_dim = self.config.heads
        return KVCache.create(self.config.num_hidden_layers, batch, max_length, kv_heads,
                              head_dim, self.dtype)


def build(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          scan_layers: bool = False, remat_policy: str | None = None,
          task: str = "causal_lm") -> LlamaForCausalLM:
    """The Llama LM module (`task="causal_lm"`, the only task)."""
    check_task("Llama", task, "causal_lm")
    return LlamaForCausalLM(config, dtype, param_dtype, scan_layers, remat_policy)


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   scan_layers: bool = False, convert: Converter | None = None
                   ) -> dict[str, Any]:
    """Flax params from an HF LlamaForCausalLM state dict of numpy arrays (torch Linear
    weights are transposed to [in, out]); a tied `lm_head.weight` may be present or not."""
    model = build(config)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    ignore = r"lm_head\.weight|.*rotary_emb\.inv_freq" if config.tie_word_embeddings \
        else r".*rotary_emb\.inv_freq"
    params = load_hf_weights(state_dict, expected["params"], stacks=LAYER_STACKS, ignore=ignore,
                             convert=convert)
    return stack_layers(params, LAYER_STACKS[0]) if scan_layers else params
