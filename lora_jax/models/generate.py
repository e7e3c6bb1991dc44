"""KV-cache decoding and `generate` for the causal LMs (GPT-2, Llama, BLOOM); `generate_seq2seq`
for the encoder-decoder (T5).

The cache is an explicit argument: a causal LM's `__call__(input_ids, attention_mask=None,
position_ids=None, cache=None)` returns logits, or `(logits, new_cache)` when given a `KVCache`
(from `model.init_cache(batch, max_length)`). The cache has a fixed number of slots, so a jitted
decode step compiles once. With a cache, `attention_mask` covers all the cache's slots [B, S]
(1 = a real token), and the new tokens fill the slots from `cache.index` on. Without a cache,
`segment_ids` [B, T] packs several sequences into one row: a token attends only to the tokens
before it with its segment id, and positions restart at 0 with each segment.

`generate` works with any `apply_fn` with `module.apply`'s signature, e.g. plain `model.apply`
with merged params or `lora_jax.wrap(model.apply, config)` with un-merged LoRA factors:

    model, params = ...                      # e.g. lora_jax.models.gguf.load_gguf(path)[:2]
    tokens = generate(model.apply, params, model, input_ids, max_new_tokens=20)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from lora_jax.models.attention import attention
from lora_jax.models.layers import Stacked


@struct.dataclass
class KVCache:
    """Keys and values of every layer, [L, B, S, K, H], and the number of slots filled."""

    key: jax.Array
    value: jax.Array
    index: jax.Array  # int32 scalar

    @classmethod
    def create(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int,
               head_dim: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache with `max_length` slots per sequence."""
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


@struct.dataclass
class DecodeInputs:
    """What every layer needs besides its own cache slice: the boolean mask [B, 1, T, S] (None:
    plain causal attention, which cuDNN runs without a mask tensor), the first slot the new
    tokens go to, and the position of each new token [B, T]."""

    mask: jax.Array | None
    index: jax.Array
    positions: jax.Array


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] that restart at 0 wherever the segment id changes along a row.

    >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    steps = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return steps - jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)


def decode_inputs(input_ids: jax.Array, attention_mask: jax.Array | None,
                  position_ids: jax.Array | None, cache: KVCache | None,
                  segment_ids: jax.Array | None = None) -> DecodeInputs:
    """The causal mask (padding and packing included) and positions for a forward with or
    without a cache.

    Query t sits in slot `index + t` and sees key slot s iff s <= index + t, the key is not
    padding and (with `segment_ids`, packed rows) both have the same segment id. Default
    positions count slots from 0, as HF does without `position_ids`, and restart with each
    segment. Without a cache, padding or segments the mask is None (causal).
    """
    batch, length = input_ids.shape
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    slots = length if cache is None else cache.key.shape[2]
    if attention_mask is not None and attention_mask.shape != (batch, slots):
        what = "the input" if cache is None else "the cache's slots"
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape}; expected {(batch, slots)}, one "
            f"entry per token of {what}"
        )
    if segment_ids is not None and (cache is not None or segment_ids.shape != (batch, length)):
        raise ValueError(f"segment_ids {segment_ids.shape} packs the rows of a forward without a "
                         f"cache: give one id per input token, shape {(batch, length)}")
    query_slot = index + jnp.arange(length)
    mask = None
    if cache is not None or attention_mask is not None or segment_ids is not None:
        causal = jnp.arange(slots)[None, :] <= query_slot[:, None]  # [T, S]
        mask = jnp.broadcast_to(causal, (batch, 1, length, slots))
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if position_ids is None:
        position_ids = (jnp.broadcast_to(query_slot, (batch, length)) if segment_ids is None
                        else segment_positions(segment_ids))
    return DecodeInputs(mask, index, position_ids)


def cached_attention(
    query: jax.Array, key: jax.Array, value: jax.Array,
    layer_cache: tuple[jax.Array, jax.Array] | None, inputs: DecodeInputs,
    *, bias: jax.Array | None = None, scale: float | None = None, softcap: float | None = None,
    window: jax.Array | int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attention of [B, T, N, H] queries over this layer's cache with the new keys/values written
    at `inputs.index`; returns the output and the updated (key, value) slices (None without a
    cache). `scale` and `softcap` as in `attention`; with a `window`, query slot q sees the key
    slots s with q - window < s <= q (HF's sliding window, counted in cache slots)."""
    if layer_cache is not None:
        start = (0, inputs.index, 0, 0)
        key = jax.lax.dynamic_update_slice(layer_cache[0], key.astype(layer_cache[0].dtype), start)
        value = jax.lax.dynamic_update_slice(
            layer_cache[1], value.astype(layer_cache[1].dtype), start)
        layer_cache = (key, value)
    mask = inputs.mask
    if window is not None:
        query_slot = inputs.index + jnp.arange(query.shape[1])
        distance = query_slot[:, None] - jnp.arange(key.shape[1])[None, :]
        near = (distance >= 0) & (distance < window)  # [T, S]
        mask = near if mask is None else mask & near
    out = attention(query, key.astype(query.dtype), value.astype(query.dtype), mask=mask,
                    bias=bias, scale=scale, softcap=softcap, is_causal=mask is None)
    return out, layer_cache


def layer_caches(cache: KVCache | None) -> tuple[jax.Array, jax.Array] | None:
    """The per-layer (key, value) stacks that `stacking.layer_stack` slices layer by layer."""
    return None if cache is None else (cache.key, cache.value)


def advance(cache: KVCache, new: tuple[jax.Array, jax.Array], length: int) -> KVCache:
    """The cache after a forward of `length` new tokens wrote `new`."""
    return KVCache(new[0], new[1], cache.index + length)


class CausalLM(Stacked):
    """Base of the causal LMs: `__call__(input_ids, attention_mask=None, position_ids=None,
    cache=None, segment_ids=None)` with the cache protocol above, and `init_cache`. A subclass
    defines `hidden(input_ids, inputs, caches, attention_mask) -> (hidden states, new caches)`,
    `logits(hidden)` and `cache_shape(max_length) -> (layers, kv_heads, head_dim)`."""

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, cache: KVCache | None = None,
                 segment_ids: jax.Array | None = None
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [B, T, V]; with a `cache`, `(logits, updated cache)`. `segment_ids` [B, T]
        (no cache) keeps the attention of packed sequences inside each one."""
        inputs = decode_inputs(input_ids, attention_mask, position_ids, cache, segment_ids)
        h, new = self.hidden(input_ids, inputs, layer_caches(cache), attention_mask)
        logits = self.logits(h)
        if cache is None:
            return logits
        return logits, advance(cache, new, input_ids.shape[1])

    def init_cache(self, batch: int, max_length: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_length` tokens."""
        layers, kv_heads, head_dim = self.cache_shape(max_length)
        return KVCache.create(layers, batch, max_length, kv_heads, head_dim, self.dtype)


# --- sampling -------------------------------------------------------------------------------------

def filter_logits(logits: jax.Array, *, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """Set logits outside the top-k / nucleus (top-p) sets to -inf, as HF's warpers do (top-k
    first). The most likely token always stays."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = before < top_p
        keep = keep.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def _next_token(logits: jax.Array, key: jax.Array, temperature: float,
                top_k: int | None, top_p: float | None) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, logits, axis=-1)


@partial(jax.jit, static_argnames=("apply_fn", "model", "max_new_tokens", "temperature", "top_k",
                                   "top_p", "eos_token_id", "pad_token_id"))
def _generate(apply_fn, params, model, input_ids, attention_mask, key, adapter_ids, *,
              max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id):
    batch, length = input_ids.shape
    # A set's per-sequence adapters (lora_jax.adapters): the same ids at every step.
    extra = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    cache = model.init_cache(batch, length + max_new_tokens)
    mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    # Positions skip left padding, as HF's generate does.
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    variables = {"params": params}

    logits, cache = apply_fn(variables, input_ids, attention_mask=mask,
                             position_ids=positions[:, :length], cache=cache, **extra)
    token = _next_token(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p)
    out = jnp.full((batch, max_new_tokens), pad_token_id, input_ids.dtype)

    def body(state):
        i, token, done, cache, out = state
        token = jnp.where(done, pad_token_id, token).astype(out.dtype)
        out = out.at[:, i].set(token)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        pos = jax.lax.dynamic_slice_in_dim(positions, length + i, 1, axis=1)
        logits, cache = apply_fn(variables, token[:, None], attention_mask=mask,
                                 position_ids=pos, cache=cache, **extra)
        nxt = _next_token(logits[:, -1], jax.random.fold_in(key, i + 1), temperature, top_k, top_p)
        return i + 1, nxt, done, cache, out

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    done = jnp.zeros((batch,), bool)
    *_, out = jax.lax.while_loop(cond, body, (0, token, done, cache, out))
    return jnp.concatenate([input_ids, out], axis=1)


def _check_sampling(max_new_tokens: int, temperature: float, key: jax.Array | None,
                    top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):  # NaN fails the comparison
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(0)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def generate(
    apply_fn: Callable[..., Any],
    params: Any,
    model: nn.Module,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """Continue `input_ids` [B, T] by `max_new_tokens`; returns [B, T + max_new_tokens].

    `temperature=0` is greedy; otherwise tokens are sampled from softmax(logits / temperature)
    restricted to the top-k / top-p sets, with `key` (required). `model` is the causal LM (for
    `init_cache`); `apply_fn` is `model.apply` or `lora_jax.wrap(model.apply, config)`. Left-pad
    a batch of prompts and pass `attention_mask`. After `eos_token_id` a sequence is filled with
    `pad_token_id` (default: the EOS id, else 0); decoding stops once every sequence is done.
    Prefill and the decode loop run in one jitted function, compiled once per shape and setting.
    With an adapter set (`lora_jax.adapters`) in `params`, `adapter_ids` [B] gives each
    sequence its adapter (-1: the base alone).
    """
    _check_sampling(max_new_tokens, temperature, key, top_k, top_p)
    if not hasattr(model, "init_cache"):
        raise ValueError(f"{type(model).__name__} has no KV cache (init_cache): not a causal LM")
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    return _generate(
        apply_fn, params, model, input_ids, jnp.asarray(attention_mask),
        jax.random.key(0) if key is None else key, adapter_ids,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
        top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


# --- encoder-decoder (T5) -------------------------------------------------------------------------

@partial(jax.jit, static_argnames=("apply_fn", "max_new_tokens", "temperature", "top_k", "top_p",
                                   "eos_token_id", "pad_token_id", "decoder_start_token_id"))
def _generate_seq2seq(apply_fn, params, input_ids, attention_mask, key, *, max_new_tokens,
                      temperature, top_k, top_p, eos_token_id, pad_token_id,
                      decoder_start_token_id):
    variables = {"params": params}
    encoded = apply_fn(variables, input_ids, attention_mask, method="encode")
    batch = input_ids.shape[0]
    # The decoder reads a fixed buffer (one compiled shape); causal attention keeps the unfilled
    # slots after position i out of position i's logits.
    tokens = jnp.full((batch, max_new_tokens + 1), pad_token_id, input_ids.dtype)
    tokens = tokens.at[:, 0].set(decoder_start_token_id)

    def body(state):
        i, done, tokens = state
        logits = apply_fn(variables, tokens[:, :-1], encoded, attention_mask, method="decode")
        logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
        token = _next_token(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
        token = jnp.where(done, pad_token_id, token).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i + 1))
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        return i + 1, done, tokens

    def cond(state):
        i, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    *_, tokens = jax.lax.while_loop(cond, body, (0, jnp.zeros((batch,), bool), tokens))
    return tokens[:, 1:]


def generate_seq2seq(
    apply_fn: Callable[..., Any],
    params: Any,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    attention_mask: jax.Array | None = None,
    decoder_start_token_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """The decoder's output [B, max_new_tokens] for encoder inputs `input_ids` [B, S] of an
    encoder-decoder with `encode(input_ids, attention_mask)` and `decode(decoder_input_ids,
    encoder_hidden, attention_mask)` methods (T5): the encoder runs once, then the decoder
    starts from `decoder_start_token_id`. Sampling and `eos_token_id` / `pad_token_id` as in
    `generate`. Each step recomputes the decoder over a fixed buffer (no KV cache): meant for
    short outputs (tags, titles).

        tags = generate_seq2seq(lora_jax.wrap(model.apply, config), params, ids, 16)
    """
    _check_sampling(max_new_tokens, temperature, key, top_k, top_p)
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    return _generate_seq2seq(
        apply_fn, params, input_ids, jnp.asarray(attention_mask),
        jax.random.key(0) if key is None else key, max_new_tokens=max_new_tokens,
        temperature=float(temperature), top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id)
