"""One configurable decoder-only transformer, with HF parameter paths: Llama, and the families that
are switches on it: Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm), Mistral (sliding-window
attention), Gemma 2 (soft-capped attention and logits, pre/post norms, alternating local/global
layers, scaled embeddings), Gemma 3 text (Gemma 2 plus q/k norms and a local rope base), Phi-3
(fused `qkv_proj` and `gate_up_proj`), Qwen3-MoE and Mixtral (a routed mixture of experts).

Paths (HF's): `model.embed_tokens`, `model.layers_<i>.{input_layernorm, self_attn.{q_proj,
k_proj, v_proj | qkv_proj, o_proj, q_norm, k_norm}, post_attention_layernorm,
pre_feedforward_layernorm, post_feedforward_layernorm, mlp.{gate_proj, up_proj | gate_up_proj,
down_proj}}`, `model.norm`, and `lm_head` unless `tie_word_embeddings` (the head is then
`embed_tokens.attend`). With `scan_layers=True` the layers are one scanned `model.layers`. Which
family a config is comes from `model_type`; the family's switches are in its
`lora_jax.models.registry.Architecture` record (`settings`).

    config = config_from_hf(hf_model.config.to_dict())      # e.g. a Qwen3 config
    model = build(config, scan_layers=True, remat_policy="nothing_saveable")
    params = params_from_hf(state_dict, config, scan_layers=True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lora_jax.core.factors import Layout, embed_delta
from lora_jax.core.rules import Rule, qualname, register_rule
from lora_jax.models.experts import Experts, Router, fused_experts
from lora_jax.models.generate import CausalLM, DecodeInputs, cached_attention
from lora_jax.models.layers import Layer, Stacked, activation, check_task
from lora_jax.models.registry import architecture
from lora_jax.models.stacking import Converter, config_from_dict, hf_params, layer_stack, run_layers

LAYER_STACKS = ("model.layers",)
# `lora_jax.sharding.match_specs` rules for the scanned model (leading None: the layer axis) on
# a mesh with "fsdp" and "tensor" axes: Megatron-style tensor parallelism (column-parallel in,
# row-parallel out) with fsdp on the other weight axis.
SHARDING_RULES = [
    (r".*(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj)\.kernel",
     P(None, "fsdp", "tensor")),
    (r".*(o_proj|down_proj)\.kernel", P(None, "tensor", "fsdp")),
    (r".*embed_tokens\.embedding", P("tensor", "fsdp")),
    (r"lm_head\.kernel", P("fsdp", "tensor")),
]
SLIDING, FULL = "sliding_attention", "full_attention"
_NO_WINDOW = 2**30  # a full-attention layer's window in a stack that mixes both kinds


@dataclasses.dataclass(frozen=True)
class Config:
    """Decoder hyperparameters (HF names) and the family's switches.

    HF fields: `head_dim` None = hidden_size // num_attention_heads, `num_key_value_heads` None =
    num_attention_heads; `sliding_window` with `layer_types` (None: every layer slides when a
    window is set); `rope_factor` is linear rope scaling; `local_rope_theta` the rope base of the
    sliding layers (Gemma 3; None: rope_theta); `partial_rotary_factor` the share of each head
    that rotates (Phi-3). Switches: `qkv_bias` (q/k/v with biases, o without: Qwen2), `qk_norm`
    (RMSNorm over each head of q and k), `fused_qkv` / `fused_gate_up` (Phi-3's fused
    projections), `gemma_norms` (RMSNorm scales `1 + w`, computed in float32), `sandwich_norms`
    (norms after attention and around the MLP), `scale_embeddings` (embeddings times
    sqrt(hidden_size)), `query_pre_attn_scalar` (attention scale 1/sqrt of it; None: head_dim),
    `attn_logit_softcapping` / `final_logit_softcapping` (`cap * tanh(x / cap)`). With
    `num_experts` > 0 the MLP is a routed mixture of experts (`lora_jax.models.experts`): each
    token's `num_experts_per_tok` most likely experts of `moe_intermediate_size` (None:
    intermediate_size), their weights renormalised if `norm_topk_prob`.
    """

    model_type: str = "llama"
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
    rope_factor: float = 1.0
    local_rope_theta: float | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    gemma_norms: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True

    @property
    def heads(self) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        return (self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads,
                self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: whether it attends to a sliding window."""
        if self.sliding_window is None:
            return (False,) * self.num_hidden_layers
        if self.layer_types is None:
            return (True,) * self.num_hidden_layers
        return tuple(t == SLIDING for t in self.layer_types)


# Keys of a family's settings that say how to read its files; the others are Config switches.
_META = ("sliding_pattern", "unsupported", "renames", "defaults", "expert_files")


# HF's default `layer_types` of each family's config (`sliding_pattern` in the settings):
# "alternate:<p>": layer i slides unless (i + 1) % p == 0 (Gemma 2: 2, Gemma 3: 6);
# "after:max_window_layers": layers from that index on slide (Qwen2, Qwen3).
def _layer_types(hf: Mapping[str, Any], pattern: str | None, n: int) -> tuple[str, ...] | None:
    if hf.get("sliding_window") is None:
        return None  # no window: every layer attends to all before it
    if hf.get("layer_types") is not None:
        return tuple(hf["layer_types"])
    if pattern is None:
        return None
    if pattern.startswith("alternate:"):
        period = int(hf.get("sliding_window_pattern", pattern.split(":")[1]))
        return tuple(SLIDING if (i + 1) % period else FULL for i in range(n))
    first = hf.get("max_window_layers", n)
    return tuple(SLIDING if i >= first else FULL for i in range(n))


def _rope(params: Mapping[str, Any], where: str) -> tuple[float | None, float]:
    """(rope_theta, linear factor) of one rope parameter dict; rejects other rope types."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"rope_type {kind!r}{where} is not implemented (only 'default' and "
                         "'linear')")
    return params.get("rope_theta"), float(params.get("factor", 1.0)) if kind == "linear" else 1.0


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The Config of an HF `config.json` dict of a decoder family (by its `model_type`, default
    llama): the family's switches from its registry record, HF's rope formats (transformers 4
    `rope_theta` / `rope_scaling`, 5 `rope_parameters`, Gemma 3's per layer type); rejects
    options this model does not implement (other rope types, bidirectional attention, ...)."""
    hf = dict(hf_config)
    model_type = hf.get("model_type") or "llama"
    facts = architecture(model_type).settings
    switches = {k: v for k, v in facts.items() if k not in _META}
    hf = {**facts.get("defaults", {}), **hf}
    for theirs, ours in facts.get("renames", {}).items():
        if theirs in hf:
            hf[ours] = hf.pop(theirs)
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        hf["sliding_window"] = None
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if FULL in rope:  # Gemma 3: one rope per layer type
        theta, factor = _rope(rope[FULL], f" ({FULL})")
        local, local_factor = _rope(rope.get(SLIDING, {}), f" ({SLIDING})")
        if local_factor != 1.0:
            raise ValueError(f"rope scaling of the {SLIDING} layers is not implemented")
        hf["local_rope_theta"] = local if local is not None else hf.get("rope_local_base_freq")
    else:
        theta, factor = _rope(rope, "")
        hf["partial_rotary_factor"] = rope.get("partial_rotary_factor",
                                               hf.get("partial_rotary_factor", 1.0))
    hf["rope_theta"] = theta if theta is not None else hf.get("rope_theta", 10000.0)
    hf["rope_factor"] = factor
    hf["layer_types"] = _layer_types(hf, facts.get("sliding_pattern"),
                                     hf.get("num_hidden_layers", 32))
    hf = {**hf, **switches, "model_type": model_type}
    config = config_from_dict(Config, hf, {"pretraining_tp": 1, "use_bidirectional_attention":
                                           False, **facts.get("unsupported", {})})
    activation(config.hidden_act)
    if "expert_files" in facts and config.num_experts < 1:
        raise ValueError(f"a {model_type} config needs num_experts (num_local_experts) >= 1")
    return config


_SWITCHES = ("qkv_bias", "qk_norm", "fused_qkv", "fused_gate_up", "gemma_norms",
             "sandwich_norms", "scale_embeddings")
_ROPE = ("rope_theta", "rope_factor", "local_rope_theta", "partial_rotary_factor")


def config_to_hf(config: Config) -> dict[str, Any]:
    """The HF config.json dict of a Config (`config_from_hf`'s inverse; `save_hf` writes it).

    >>> config = Config(model_type="qwen3", num_hidden_layers=2, qk_norm=True)
    >>> config_from_hf(config_to_hf(config)) == config
    True
    """
    fields = dataclasses.asdict(config)
    out = {k: v for k, v in fields.items() if k not in _SWITCHES + _ROPE}
    for theirs, ours in architecture(config.model_type).settings.get("renames", {}).items():
        out[theirs] = out.pop(ours)
    rope: dict[str, Any] = {"rope_type": "default" if config.rope_factor == 1.0 else "linear",
            "rope_theta": config.rope_theta}
    if config.rope_factor != 1.0:
        rope["factor"] = config.rope_factor
    if config.local_rope_theta is not None:
        rope = {FULL: rope, SLIDING: {"rope_type": "default", "rope_theta":
                                      config.local_rope_theta}}
    elif config.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = config.partial_rotary_factor
    out["rope_parameters"] = rope
    out["layer_types"] = None if config.layer_types is None else list(config.layer_types)
    out["use_sliding_window"] = config.sliding_window is not None
    if out["head_dim"] is None:  # Qwen2 and Phi-3 read a null head_dim as given, not derived
        del out["head_dim"]
    # The tokenizer's ids are not in a Config: a class default (Phi-3's pad 32000) may lie
    # outside this vocabulary, so none are claimed.
    out.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return out


def rotary(positions: jax.Array, dim: int, theta: float, factor: float = 1.0
           ) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, 1, dim] for `apply_rotary` (frequencies repeated, as HF does); `factor`
    is linear rope scaling (positions divided by it)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim) / factor
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (HF's convention), on
    the first cos.shape[-1] features of each head (the rest pass, as Phi-3's partial rotary)."""
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """HF's RMSNorm over the last axis (param `scale`, HF `weight`): normalised in float32, then
    `scale * x` in the input's dtype, or with `offset` (Gemma) `(1 + scale) * x` in float32."""

    eps: float
    offset: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return (scale * normed.astype(x.dtype)).astype(self.dtype)


class ScaledEmbed(nn.Embed):
    """An embedding whose lookups are multiplied by `scale` (cast to the table's dtype, as HF's
    Gemma does); a LoRA delta on it is scaled too (its rule below), as peft scales it by the
    layer's `embed_scale` and as merging it into the table does."""

    scale: float = 1.0

    def __call__(self, inputs: jax.Array) -> jax.Array:
        # Not super().__call__: the LoRA interceptor would see this lookup twice.
        out = jnp.take(jnp.asarray(self.embedding, self.dtype), inputs, axis=0)
        return out * self._scale(out.dtype)

    def _scale(self, dtype: Any) -> jax.Array:
        return jnp.asarray(self.scale, self.param_dtype).astype(dtype)


def _scaled_embed_delta(module: ScaledEmbed, ids: jax.Array, a: jax.Array, b: jax.Array,
                        args: Any, kwargs: Any) -> jax.Array:
    delta = embed_delta(ids, a, b)
    return delta * module._scale(delta.dtype)


# nn.Embed's rule with the lookup's scale on the delta (peft's `embed_scale`).
register_rule(Rule(names=(qualname(ScaledEmbed),), weight="embedding", dropout=False,
                   layout=lambda module, weight, args, kwargs: Layout("embed"),
                   delta=_scaled_embed_delta))


class _Layer(Layer):
    def norm(self, name: str | None = None) -> RMSNorm:
        c = self.config
        return RMSNorm(c.rms_norm_eps, c.gemma_norms, self.dtype, self.param_dtype, name=name)


class _Rope(NamedTuple):
    """cos/sin of the global rope and, if the sliding layers have their own base, theirs."""

    full: tuple[jax.Array, jax.Array]
    local: tuple[jax.Array, jax.Array] | None

    def pick(self, sliding: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.local is None:
            return self.full
        cos, sin = (jnp.where(sliding, loc, full) for loc, full in zip(self.local, self.full,
                                                                       strict=True))
        return cos, sin


class Attention(_Layer):
    """Grouped-query attention with rotary embeddings, optional q/k norms, soft-capping and a
    sliding window."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_cache: Any, inputs: DecodeInputs,
                 rope: tuple[jax.Array, jax.Array], window: jax.Array | None
                 ) -> tuple[jax.Array, Any]:
        c = self.config
        heads, kv_heads, head_dim = c.heads
        batch, length, _ = x.shape
        bias = c.attention_bias or c.qkv_bias
        split = lambda t, n: t.reshape(batch, length, n, head_dim)
        if c.fused_qkv:
            qkv = self.dense((heads + 2 * kv_heads) * head_dim, "qkv_proj", bias)(x)
            q, k, v = jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], -1)
            q, k, v = split(q, heads), split(k, kv_heads), split(v, kv_heads)
        else:
            q, k, v = (split(self.dense(n * head_dim, name, bias)(x), n) for name, n in
                       (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)))
        if c.qk_norm:
            q, k = self.norm("q_norm")(q), self.norm("k_norm")(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        scale = (c.query_pre_attn_scalar or head_dim) ** -0.5
        out, layer_cache = cached_attention(q, k, v, layer_cache, inputs, scale=scale,
                                            softcap=c.attn_logit_softcapping, window=window)
        out = out.reshape(batch, length, heads * head_dim)
        return self.dense(c.hidden_size, "o_proj", c.attention_bias)(out), layer_cache


class MLP(_Layer):
    """`down_proj(act(gate) * up)`, gate and up from `gate_proj` / `up_proj` or the halves of
    the fused `gate_up_proj`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        act = activation(c.hidden_act)
        if c.fused_gate_up:
            gate, up = jnp.split(self.dense(2 * c.intermediate_size, "gate_up_proj",
                                            c.mlp_bias)(x), 2, axis=-1)
        else:
            gate = self.dense(c.intermediate_size, "gate_proj", c.mlp_bias)(x)
            up = self.dense(c.intermediate_size, "up_proj", c.mlp_bias)(x)
        return self.dense(c.hidden_size, "down_proj", c.mlp_bias)(act(gate) * up)


class SparseMoe(_Layer):
    """HF's sparse MoE block: the router `gate` and the fused `experts`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = x.reshape(-1, x.shape[-1])
        chosen, weights = Router(c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, **kw,
                                 name="gate")(tokens)
        out = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size or
                      c.intermediate_size, activation(c.hidden_act), **kw,
                      name="experts")(tokens, chosen, weights)
        return out.reshape(x.shape)


class DecoderLayer(_Layer):
    """Pre-norm block (and Gemma's post norms); `(x, (layer_cache, sliding), inputs, rope) ->
    (x, layer_cache)`."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_input: tuple[Any, jax.Array], inputs: DecodeInputs,
                 rope: _Rope) -> tuple[jax.Array, Any]:
        c = self.config
        layer_cache, sliding = layer_input
        window = None if c.sliding_window is None else jnp.where(sliding, c.sliding_window,
                                                                  _NO_WINDOW)
        kw = self.layer_kwargs
        mlp = SparseMoe if c.num_experts else MLP
        out, layer_cache = Attention(**kw, name="self_attn")(
            self.norm("input_layernorm")(x), layer_cache, inputs, rope.pick(sliding), window)
        if c.sandwich_norms:
            x = x + self.norm("post_attention_layernorm")(out)
            out = mlp(**kw, name="mlp")(self.norm("pre_feedforward_layernorm")(x))
            return x + self.norm("post_feedforward_layernorm")(out), layer_cache
        x = x + out
        return x + mlp(**kw, name="mlp")(self.norm("post_attention_layernorm")(x)), layer_cache


class DecoderModel(_Layer, Stacked):
    """Embeddings, decoder layers and the final norm (HF `model`)."""

    def setup(self) -> None:
        c = self.config
        scale = math.sqrt(c.hidden_size) if c.scale_embeddings else 1.0
        self.embed_tokens = ScaledEmbed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                        param_dtype=self.param_dtype, scale=scale)
        self.layers = layer_stack(DecoderLayer, self.layer_kwargs, c.num_hidden_layers,
                                  scan=self.scan_layers, remat_policy=self.remat_policy,
                                  num_broadcast=2)
        self.norm = self.norm()  # type: ignore[method-assign,assignment]  # the final RMSNorm (HF `model.norm`) replaces the factory

    def __call__(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any
                 ) -> tuple[jax.Array, Any]:
        """Hidden states [B, T, D] after the final norm, and the layers' updated caches."""
        c = self.config
        dim = int(c.heads[2] * c.partial_rotary_factor)
        full = rotary(inputs.positions, dim, c.rope_theta, c.rope_factor)
        local = None if c.local_rope_theta is None else rotary(inputs.positions, dim,
                                                               c.local_rope_theta)
        sliding = jnp.asarray(c.sliding)
        x, caches = run_layers(self.layers, self.embed_tokens(input_ids), (caches, sliding),
                               inputs, _Rope(full, local))
        return self.norm(x), caches  # type: ignore[return-value]  # the RMSNorm set in setup


class DecoderForCausalLM(_Layer, CausalLM):
    """The decoder with its LM head (Gemma's logits soft-capped); see
    `lora_jax.models.generate` for the cache protocol."""

    def setup(self) -> None:
        self.model = DecoderModel(**self.stacked_kwargs)
        if not self.config.tie_word_embeddings:
            self.lm_head = self.dense(self.config.vocab_size, use_bias=False)

    def hidden(self, input_ids: jax.Array, inputs: DecodeInputs, caches: Any,
               attention_mask: jax.Array | None) -> tuple[jax.Array, Any]:
        return self.model(input_ids, inputs, caches)

    def logits(self, h: jax.Array) -> jax.Array:
        c = self.config
        logits = self.model.embed_tokens.attend(h) if c.tie_word_embeddings else self.lm_head(h)
        if c.final_logit_softcapping is None:
            return logits
        cap = c.final_logit_softcapping
        return (jnp.tanh(logits / cap) * cap).astype(logits.dtype)

    def cache_shape(self, max_length: int) -> tuple[int, int, int]:
        return (self.config.num_hidden_layers, *self.config.heads[1:])


def build(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          scan_layers: bool = False, remat_policy: str | None = None,
          task: str = "causal_lm") -> DecoderForCausalLM:
    """The causal LM module (`task="causal_lm"`, the only task)."""
    check_task(config.model_type, task, "causal_lm")
    return DecoderForCausalLM(config, dtype, param_dtype, scan_layers, remat_policy)


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   scan_layers: bool = False, convert: Converter | None = None
                   ) -> dict[str, Any]:
    """Flax params from an HF state dict of numpy arrays (torch Linear weights are transposed to
    [in, out]); a tied `lm_head.weight` may be present or not."""
    ignore = r".*rotary_emb\..*inv_freq"
    if config.tie_word_embeddings:
        ignore += r"|lm_head\.weight"
    files = architecture(config.model_type).settings.get("expert_files")
    if files is not None:  # the checkpoint may hold each expert's weights apart
        state_dict = fused_experts(state_dict, files, config.num_experts)
    return hf_params(build(config), state_dict, LAYER_STACKS, scan_layers=scan_layers,
                     ignore=ignore, convert=convert)
