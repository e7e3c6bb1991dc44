"""BERT (HF `BertModel`, `BertForSequenceClassification`) as Flax linen modules with HF paths.

Post-LayerNorm encoder with absolute position and token-type embeddings and a padding
`attention_mask`. Paths (`task="base"`, HF `BertModel`): `embeddings.{word_embeddings,
position_embeddings, token_type_embeddings, LayerNorm}`, `encoder.layer_<i>.{attention.self.{query,
key, value}, attention.output.{dense, LayerNorm}, intermediate.dense, output.{dense, LayerNorm}}`,
`pooler.dense`. `task="classify"` (HF `BertForSequenceClassification`) nests that under `bert` and
adds the `classifier` head. With `scan_layers=True` the layers are one scanned `encoder.layer`.
HF's dropouts are not modelled (the model is deterministic); LoRA dropout comes from `wrap`.
all-MiniLM-L6-v2 is a BERT; `mean_pool` gives its sentence embeddings.

    config = config_from_hf(hf_model.config.to_dict())
    model = build(config, task="classify")
    params = params_from_hf(state_dict, config, task="classify")
    logits = model.apply({"params": params}, input_ids, attention_mask)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.attention import attention
from lora_jax.models.layers import Layer, Stacked, activation
from lora_jax.models.registry import architecture
from lora_jax.models.stacking import Converter, config_from_dict, hf_params, layer_stack, run_layers

LAYER_STACKS = architecture("bert").stacks


@dataclasses.dataclass(frozen=True)
class Config:
    """BERT hyperparameters (HF names); `num_labels` is the classifier's output size."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2


def config_from_hf(hf_config: Mapping[str, Any]) -> Config:
    """The Config of an HF BERT `config.json` dict (`num_labels` from `id2label`); rejects
    options this model lacks (relative position embeddings, decoder use)."""
    hf_config = dict(hf_config)
    if "id2label" in hf_config and "num_labels" not in hf_config:
        hf_config["num_labels"] = len(hf_config["id2label"])
    config = config_from_dict(Config, hf_config, {
        "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False})
    activation(config.hidden_act)
    return config


class _Layer(Layer):
    norm_eps: ClassVar[str] = "layer_norm_eps"


class BertSelfAttention(_Layer):
    """`query`/`key`/`value` projections and attention over the unmasked keys."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        batch, length, _ = x.shape
        heads = lambda name: self.dense(c.hidden_size, name)(x).reshape(
            batch, length, c.num_attention_heads, -1)
        out = attention(heads("query"), heads("key"), heads("value"), mask=mask)
        return out.reshape(batch, length, c.hidden_size)


class BertAddNorm(_Layer):
    """HF `BertSelfOutput` / `BertOutput`: `LayerNorm(dense(x) + residual)`."""

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.norm("LayerNorm")(self.dense(self.config.hidden_size, "dense")(x) + residual)


class BertAttention(_Layer):
    """HF `BertAttention`: `self` (the attention) and `output` (dense + residual LayerNorm)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = self.layer_kwargs
        return BertAddNorm(**kw, name="output")(BertSelfAttention(**kw, name="self")(x, mask), x)


class BertIntermediate(_Layer):
    """`act(dense(x))`."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        return activation(c.hidden_act)(self.dense(c.intermediate_size, "dense")(x))


class BertLayer(_Layer):
    """One post-LayerNorm encoder layer; `(x, None, mask) -> (x, None)` for `run_layers`."""

    @nn.compact
    def __call__(self, x: jax.Array, layer_input: None, mask: jax.Array) -> tuple[jax.Array, None]:
        kw = self.layer_kwargs
        x = BertAttention(**kw, name="attention")(x, mask)
        h = BertIntermediate(**kw, name="intermediate")(x)
        return BertAddNorm(**kw, name="output")(h, x), None


class BertEncoder(_Layer, Stacked):
    """The layer stack (HF `encoder.layer`)."""

    def setup(self) -> None:
        kw = self.layer_kwargs
        self.layer = layer_stack(BertLayer, kw, self.config.num_hidden_layers,
                                 scan=self.scan_layers, remat_policy=self.remat_policy)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return run_layers(self.layer, x, None, mask)[0]


class BertEmbeddings(_Layer):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
                 position_ids: jax.Array) -> jax.Array:
        c = self.config
        x = (self.embed(c.vocab_size, c.hidden_size, "word_embeddings")(input_ids)
             + self.embed(c.max_position_embeddings, c.hidden_size,
                          "position_embeddings")(position_ids)
             + self.embed(c.type_vocab_size, c.hidden_size,
                          "token_type_embeddings")(token_type_ids))
        return self.norm("LayerNorm")(x)


class BertPooler(_Layer):
    """`tanh(dense(hidden[:, 0]))`: the first ([CLS]) token's pooled representation."""

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(_Layer, Stacked):
    """The BERT encoder with its pooler (HF `BertModel`)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`(last_hidden_state [B, T, D], pooler_output [B, D])`; `attention_mask` [B, T] is 1
        for real tokens, 0 for padding (default all 1); positions default to 0..T-1."""
        kw = self.layer_kwargs
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, length), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x = BertEmbeddings(**kw, name="embeddings")(input_ids, token_type_ids, position_ids)
        mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1(heads), 1(queries), S]
        x = BertEncoder(**self.stacked_kwargs, name="encoder")(x, mask)
        return x, BertPooler(**kw, name="pooler")(x)


class BertForSequenceClassification(_Layer, Stacked):
    """`bert` (BertModel) and a `classifier` Dense on the pooled output; returns logits [B, L]."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> jax.Array:
        """Logits [B, num_labels]; arguments as for `BertModel`."""
        _, pooled = BertModel(**self.stacked_kwargs, name="bert")(
            input_ids, attention_mask, token_type_ids, position_ids)
        return self.dense(self.config.num_labels, "classifier")(pooled)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array, *, normalize: bool = True
              ) -> jax.Array:
    """sentence-transformers' sentence embedding: the mean of the unpadded token states,
    L2-normalized (as all-MiniLM-L6-v2 is used) unless `normalize=False`.

    >>> h = jnp.array([[[3.0, 4.0], [9.0, 9.0]]]); mean_pool(h, jnp.array([[1, 0]]))
    Array([[0.6, 0.8]], dtype=float32)
    """
    mask = attention_mask[..., None].astype(hidden.dtype)
    mean = (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
    if not normalize:
        return mean
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def build(config: Config, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          scan_layers: bool = False, remat_policy: str | None = None,
          task: str = "base") -> BertModel | BertForSequenceClassification:
    """`task="base"`: BertModel; `task="classify"`: BertForSequenceClassification."""
    classes: dict[str, type[BertModel] | type[BertForSequenceClassification]] = {
        "base": BertModel, "classify": BertForSequenceClassification}
    if task not in classes:
        raise ValueError(f"BERT supports task='base' or 'classify', got {task!r}")
    return classes[task](config, dtype, param_dtype, scan_layers, remat_policy)


def params_from_hf(state_dict: Mapping[str, Any], config: Config, *,
                   scan_layers: bool = False, task: str = "base",
                   convert: Converter | None = None) -> dict[str, Any]:
    """Flax params from an HF BertModel (`task="base"`) or BertForSequenceClassification
    (`task="classify"`) state dict of numpy arrays; torch Linear weights are transposed."""
    return hf_params(build(config, task=task), state_dict, LAYER_STACKS, scan_layers=scan_layers,
                     stack=LAYER_STACKS[0] if task == "base" else LAYER_STACKS[1],
                     convert=convert,
                     ignore=r"(bert\.)?embeddings\.(position_ids|token_type_ids)")
