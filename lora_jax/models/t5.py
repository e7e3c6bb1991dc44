"""T5 (HF `T5ForConditionalGeneration`) as a Flax linen module with HF parameter paths.

Encoder-decoder with bucketed relative position biases (bidirectional in the encoder, causal in
the decoder; only the first block of each stack holds the bias table and the other blocks reuse
its biases), no 1/sqrt(d) attention scaling, T5's RMS LayerNorm (scale only), and a
`DenseReluDense` feed-forward (`wi`, `wo`; gated variants such as `gated-gelu` have `wi_0`,
`wi_1`). The token embedding `shared` serves both stacks; the LM head is `shared.attend` when
`tie_word_embeddings`, else `lm_head`, and the decoder output is rescaled by `d_model**-0.5` when
`scale_decoder_outputs` (default: as tied; original T5 does, T5 v1.1 / flan-T5 does not).

Paths: `shared`, `encoder.block_<i>.layer_0.{SelfAttention.{q,k,v,o}, layer_norm}`,
`encoder.block_<i>.layer_1.{DenseReluDense.{wi | wi_0, wi_1, wo}, layer_norm}`,
`encoder.block_0.layer_0.SelfAttention.relative_attention_bias`, `encoder.final_layer_norm`; the
decoder likewise with `layer_1.EncDecAttention` and `layer_2` the feed-forward. With
`scan_layers=True` the blocks are one scanned `encoder.block` / `decoder.block` and each stack's
bias table moves to `encoder.relative_attention_bias` (the scanned blocks must be uniform);
`stack_params` / `unstack_params` convert params (or LoRA trees) between the two layouts.

    config = config_from_hf(hf_model.config.to_dict())
    model = build(config)
    params = params_from_hf(state_dict, config)
    logits = model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.core.targets import register_path_alias
from lora_jax.models.attention import attention
from lora_jax.models.layers import Layer, activation, check_task
from lora_jax.models.registry import architecture
from lora_jax.models.stacking import (
    Converter,
    config_from_dict,
    layer_stack,
    load_hf_weights,
    run_layers,
    stack_layers,
    unstack_layers,
)

LAYER_STACKS = architecture("t5").stacks
_STACKS = ("encoder", "decoder")
_BIAS_PATH = ("block_0", "layer_0", "SelfAttention", "relative_attention_bias")
# Scanned, each stack's bias table sits beside the blocks; peft names it in the first block.
for _stack in _STACKS:
    register_path_alias(f"{_stack}.relative_attention_bias",
                        f"{_stack}.block.0.layer.0.SelfAttention.relative_attention_bias")


@dataclasses.dataclass(frozen=True)
class Config:
    """T5 hyperparameters (HF names); `num_decoder_layers` None = `num_layers`,
    `scale_decoder_outputs` None = `tie_word_embeddings`."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    decoder_start_token_id: int = 0  # the decoder's first input (T5: the pad token)

    @property
    def is_gated(self) -> bool:
        """`gated-<act>`: `wo(act(wi_0(x)) * wi_1(x))` instead of `wo(act(wi(x)))`."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The HF activation name (`gated-gelu` means the tanh approximation, as in HF)."""
        return {"gated-gelu": "gelu_new"}.get(self.feed_forward_proj,
                                               self.feed_forward_proj.split("-")[-1])

    @property
    def rescale(self) -> bool:
        """Whether the decoder output is multiplied by `d_model**-0.5` before the head."""
        if self.scale_decoder_outputs is None:
            return self.tie_word_embeddings
        return self.scale_decoder_outputs


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The Config of an HF T5 `config.json` dict.

    transformers >= 5 always ties the head and stores the old `tie_word_embeddings=False` as
    `scale_decoder_outputs=False`; older configs (e.g. flan-T5's) with `tie_word_embeddings=False`
    give an untied `lm_head` without rescaling.
    """
    config = config_from_dict(Config, hf_config, {"is_decoder": False})
    parts = config.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {config.feed_forward_proj!r} must be "
                         f"'<act>' or 'gated-<act>'")
    activation(config.dense_act_fn)
    return config


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bucket of each `key - query` offset: exact for small offsets, log-spaced up to
    `max_distance`; in the bidirectional case half the buckets are for positive offsets."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    large = max_exact + (
        jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(relative_position < max_exact, relative_position, large)


class _Layer(Layer):
    # T5LayerNorm: x * rsqrt(mean(x^2) + eps) * scale, no mean subtraction, no bias.
    norm_cls: ClassVar[type[nn.Module]] = nn.RMSNorm
    use_bias: ClassVar[bool] = False

    def bias_table(self, name: str | None = None) -> nn.Embed:
        """The `relative_attention_bias` table [buckets, heads]."""
        return self.embed(self.config.relative_attention_num_buckets, self.config.num_heads, name)


def position_bias(table: nn.Embed, config: Config, query_length: int, key_length: int, *,
                  bidirectional: bool) -> jax.Array:
    """The relative position bias [1, H, T, S] looked up in a `bias_table`."""
    relative = jnp.arange(key_length)[None, :] - jnp.arange(query_length)[:, None]
    buckets = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance)
    return table(buckets).transpose(2, 0, 1)[None]


class T5Attention(_Layer):
    """`q`, `k`, `v`, `o` projections, attention unscaled (T5 folds the scale into the init).

    With `has_relative_attention_bias` (the first block's self-attention) it holds the bias
    table and computes the position bias itself; it returns `(output, bias used)`.
    """

    has_relative_attention_bias: bool = False
    is_decoder: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, bias: jax.Array | None,
                 mask: jax.Array | None, is_causal: bool) -> tuple[jax.Array, jax.Array | None]:
        c = self.config
        inner = c.num_heads * c.d_kv
        if self.has_relative_attention_bias:
            bias = position_bias(self.bias_table("relative_attention_bias"), c, x.shape[1],
                                 context.shape[1], bidirectional=not self.is_decoder)
        heads = lambda name, t: self.dense(inner, name)(t).reshape(*t.shape[:2], c.num_heads,
                                                                   c.d_kv)
        out = attention(heads("q", x), heads("k", context), heads("v", context), bias=bias,
                        mask=mask, scale=1.0, is_causal=is_causal)
        return self.dense(c.d_model, "o")(out.reshape(*x.shape[:2], inner)), bias


class T5DenseReluDense(_Layer):
    """`wo(act(wi(x)))`, or gated: `wo(act(wi_0(x)) * wi_1(x))`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        act = activation(c.dense_act_fn)
        if c.is_gated:
            h = act(self.dense(c.d_ff, "wi_0")(x)) * self.dense(c.d_ff, "wi_1")(x)
        else:
            h = act(self.dense(c.d_ff, "wi")(x))
        return self.dense(c.d_model, "wo")(h)


class T5LayerFF(_Layer):
    """Pre-norm residual feed-forward."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = T5DenseReluDense(**self.layer_kwargs, name="DenseReluDense")(self.norm("layer_norm")(x))
        return x + h


class T5LayerAttention(_Layer):
    """Pre-norm residual attention: `SelfAttention`, or `EncDecAttention` over the encoder
    output when `cross`; returns `(x, bias used)` as `T5Attention` does."""

    cross: bool = False
    has_relative_attention_bias: bool = False
    is_decoder: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, bias: jax.Array | None,
                 mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        h = self.norm("layer_norm")(x)
        attn = T5Attention(**self.layer_kwargs, is_decoder=self.is_decoder,
                           has_relative_attention_bias=self.has_relative_attention_bias,
                           name="EncDecAttention" if self.cross else "SelfAttention")
        keys = h
        if self.cross:
            if context is None:
                raise ValueError("the decoder's cross-attention needs encoder_hidden, the "
                                 "encoder's output: pass `encode`'s result to `decode`")
            keys = context
        out, bias = attn(h, keys, bias, mask, is_causal=self.is_decoder and not self.cross)
        return x + out, bias


class T5Block(_Layer):
    """One block, `(x, None, position_bias, mask, encoder_hidden, encoder_mask) -> (x, bias)`:
    `layer_0` self-attention, in the decoder `layer_1` cross-attention (no position bias), then
    the feed-forward. `bias` is the position bias the block computed (the first block of an
    unscanned stack, which holds the table) or None."""

    is_decoder: bool = False
    has_relative_attention_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, layer_input: None, position_bias: jax.Array | None,
                 mask: jax.Array | None, encoder_hidden: jax.Array | None,
                 encoder_mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        kw = dict(**self.layer_kwargs, is_decoder=self.is_decoder)
        x, bias = T5LayerAttention(**kw, name="layer_0",
                                   has_relative_attention_bias=self.has_relative_attention_bias)(
            x, None, position_bias, mask)
        if self.is_decoder:
            x, _ = T5LayerAttention(**kw, cross=True, name="layer_1")(
                x, encoder_hidden, None, encoder_mask)
        x = T5LayerFF(**self.layer_kwargs, name=f"layer_{2 if self.is_decoder else 1}")(x)
        return x, bias if self.has_relative_attention_bias else None


class T5Stack(_Layer):
    """Encoder or decoder: `embed_tokens` (the shared Embed), blocks, `final_layer_norm`.

    Unscanned, the first block holds the position bias table and computes the bias the other
    blocks reuse (HF's layout); a scanned stack's blocks are uniform, so the table sits beside
    them as `relative_attention_bias` and the bias is computed before the scan.
    """

    embed_tokens: nn.Embed | None = None
    is_decoder: bool = False
    scan_layers: bool = False
    remat_policy: str | None = None

    def setup(self) -> None:
        c = self.config
        n = (c.num_decoder_layers or c.num_layers) if self.is_decoder else c.num_layers
        kw = dict(**self.layer_kwargs, is_decoder=self.is_decoder)
        stack = lambda count, **extra: layer_stack(
            T5Block, {**kw, **extra}, count, scan=self.scan_layers,
            remat_policy=self.remat_policy, num_broadcast=4)
        if self.scan_layers:
            self.block = stack(n)
            self.relative_attention_bias = self.bias_table()
        else:
            self.block = [*stack(1, has_relative_attention_bias=True), *stack(n - 1)]
        self.final_layer_norm = self.norm("final_layer_norm")

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                 encoder_hidden: jax.Array | None = None,
                 encoder_mask: jax.Array | None = None) -> jax.Array:
        """Hidden states [B, T, d_model]; masks are [B, T] / [B, S] with 1 for real tokens."""
        mask, encoder_mask = (None if m is None else m.astype(bool)[:, None, None, :]
                              for m in (attention_mask, encoder_mask))
        if self.embed_tokens is None:
            raise ValueError("T5Stack needs embed_tokens, the model's shared nn.Embed")
        x = self.embed_tokens(input_ids)
        broadcast = (mask, encoder_hidden, encoder_mask)
        if isinstance(self.block, nn.Module):  # scanned
            length = input_ids.shape[1]
            bias = position_bias(self.relative_attention_bias, self.config, length, length,
                                 bidirectional=not self.is_decoder)
            x, _ = run_layers(self.block, x, None, bias, *broadcast)
        else:
            x, bias = self.block[0](x, None, None, *broadcast)
            for block in self.block[1:]:
                x, _ = block(x, None, bias, *broadcast)
        return self.final_layer_norm(x)


class T5ForConditionalGeneration(_Layer):
    """`shared` embedding, `encoder`, `decoder` and the LM head (tied `shared.attend` or
    `lm_head`); `__call__` gives logits, `encode` / `decode` the two halves."""

    scan_layers: bool = False
    remat_policy: str | None = None

    def setup(self) -> None:
        c = self.config
        self.shared = self.embed(c.vocab_size, c.d_model)
        stack = lambda decoder: T5Stack(**self.layer_kwargs, embed_tokens=self.shared,
                                        is_decoder=decoder, scan_layers=self.scan_layers,
                                        remat_policy=self.remat_policy)
        self.encoder, self.decoder = stack(False), stack(True)
        if not c.tie_word_embeddings:
            self.lm_head = self.dense(c.vocab_size, "lm_head")

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
               ) -> jax.Array:
        """Encoder hidden states [B, S, d_model]."""
        return self.encoder(input_ids, attention_mask)

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
               attention_mask: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] for `decoder_input_ids` given the encoder output (and its mask)."""
        h = self.decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden,
                         attention_mask)
        if self.config.rescale:
            h = h * self.config.d_model**-0.5
        return self.shared.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 decoder_input_ids: jax.Array | None = None,
                 decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V]; masks are 1 for real tokens (default all)."""
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (e.g. the pad id, 0, then the target "
                             "shifted right)")
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask),
                           attention_mask, decoder_attention_mask)


def build(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          scan_layers: bool = False, remat_policy: str | None = None,
          task: str = "seq2seq_lm") -> T5ForConditionalGeneration:
    """The T5 encoder-decoder (`task="seq2seq_lm"`, the only task)."""
    check_task("T5", task, "seq2seq_lm")
    return T5ForConditionalGeneration(config, dtype, param_dtype, scan_layers, remat_policy)


def _move(tree: Mapping[str, Any], src: tuple[str, ...], dst: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `tree` with the subtree at `src` moved to `dst` (unchanged if `src` is absent,
    as in a LoRA-only tree); emptied parents are dropped."""
    node: Any = tree
    for key in src:
        if not isinstance(node, Mapping) or key not in node:
            return dict(tree)
        node = node[key]

    def without(t: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = dict(t)
        if len(path) == 1:
            del out[path[0]]
        else:
            out[path[0]] = without(t[path[0]], path[1:])
            if not out[path[0]]:
                del out[path[0]]
        return out

    def with_(t: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        out = dict(t)
        out[path[0]] = node if len(path) == 1 else with_(t.get(path[0], {}), path[1:])
        return out

    return with_(without(tree, src), dst)


def stack_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unscanned -> scanned params (or LoRA trees): `<stack>.block_<i>` -> `<stack>.block` with
    a layer axis, and the bias table `<stack>.block_0.layer_0.SelfAttention.
    relative_attention_bias` -> `<stack>.relative_attention_bias`."""
    out = dict(params)
    for stack in _STACKS:
        out = _move(out, (stack, *_BIAS_PATH), (stack, "relative_attention_bias"))
        out = stack_layers(out, f"{stack}.block")
    return out


def unstack_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned -> unscanned params; the inverse of `stack_params`."""
    out = dict(params)
    for stack in _STACKS:
        out = unstack_layers(out, f"{stack}.block")
        out = _move(out, (stack, "relative_attention_bias"), (stack, *_BIAS_PATH))
    return out


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   scan_layers: bool = False, convert: Converter | None = None
                   ) -> dict[str, Any]:
    """Flax params from an HF T5ForConditionalGeneration state dict of numpy arrays (torch
    Linear weights transposed); the embeddings tied to `shared` (and a tied `lm_head`) may be
    present or absent."""
    model = build(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids, decoder_input_ids=ids)
    ignore = r"(encoder|decoder)\.embed_tokens\.weight"
    if config.tie_word_embeddings:
        ignore += r"|lm_head\.weight"
    params = load_hf_weights(state_dict, expected["params"], stacks=LAYER_STACKS, ignore=ignore,
                             convert=convert)
    return stack_params(params) if scan_layers else params
