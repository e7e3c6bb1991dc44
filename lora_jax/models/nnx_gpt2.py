"""GPT-2 (HF `GPT2LMHeadModel`) as a Flax NNX module with HF parameter paths.

Paths: `transformer.wte`, `transformer.wpe`, `transformer.h.<i>.{ln_1, attn.c_attn, attn.c_proj,
ln_2, mlp.c_fc, mlp.c_proj}` (an `nnx.List`), `transformer.ln_f`; the LM head is the tied `wte`
(`Embed.attend`). `scan_layers=True`: one `nnx.vmap` stack `transformer.h` run by `nnx.scan`.
Hyperparameters, HF config checks and weight loading are the linen model's
(`lora_jax.models.gpt2`); no KV cache (use the linen model to generate).

    config = gpt2.config_from_hf(hf_model.config.to_dict())
    model = from_hf(state_dict, config)              # or GPT2LMHeadModel(config, rngs=...)
    logits = model(input_ids)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.models import gpt2
from lora_jax.models.attention import attention
from lora_jax.models.layers import activation
from lora_jax.models.nnx_stack import causal_mask, load, make_stack, run_stack

Config = gpt2.Config
config_from_hf = gpt2.config_from_hf
LAYER_STACKS = gpt2.LAYER_STACKS


def _kw(dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> dict[str, Any]:
    return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GPT2Attention(nnx.Module):
    def __init__(self, config: Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d = config.n_embd
        self.n_head = config.n_head
        self.c_attn = nnx.Linear(d, 3 * d, **_kw(dtype, param_dtype, rngs))
        self.c_proj = nnx.Linear(d, d, **_kw(dtype, param_dtype, rngs))

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, d = x.shape
        q, k, v = (t.reshape(batch, length, self.n_head, -1)
                   for t in jnp.split(self.c_attn(x), 3, axis=-1))
        out = attention(q, k, v, mask=mask, is_causal=True)
        return self.c_proj(out.reshape(batch, length, d))


class GPT2MLP(nnx.Module):
    def __init__(self, config: Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        inner = config.n_inner or 4 * config.n_embd
        self.act = activation(config.activation_function)
        self.c_fc = nnx.Linear(config.n_embd, inner, **_kw(dtype, param_dtype, rngs))
        self.c_proj = nnx.Linear(inner, config.n_embd, **_kw(dtype, param_dtype, rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, config: Config, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        norm = lambda: nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon,
                                     **_kw(dtype, param_dtype, rngs))
        self.ln_1 = norm()
        self.attn = GPT2Attention(config, dtype, param_dtype, rngs)
        self.ln_2 = norm()
        self.mlp = GPT2MLP(config, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nnx.Module):
    def __init__(self, config: Config, dtype: Any, param_dtype: Any, scan_layers: bool,
                 remat: bool, rngs: nnx.Rngs):
        kw = _kw(dtype, param_dtype, rngs)
        self.remat = remat
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, **kw)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, **kw)
        self.h = make_stack(lambda r: GPT2Block(config, dtype, param_dtype, r), config.n_layer,
                            rngs, scan_layers)
        self.ln_f = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.wte(input_ids) + self.wpe(positions)
        x = run_stack(self.h, x, causal_mask(attention_mask), remat=self.remat)
        return self.ln_f(x)


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with the tied LM head: `model(input_ids, attention_mask=None) -> logits`."""

    def __init__(self, config: Config, *, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, scan_layers: bool = False, remat: bool = False,
                 rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, dtype, param_dtype, scan_layers, remat, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        return self.transformer.wte.attend(self.transformer(input_ids, attention_mask))


def from_hf(state_dict: Mapping[str, Any], config: Config, *, scan_layers: bool = False,
            **kwargs: Any) -> GPT2LMHeadModel:
    """The model with an HF GPT2LMHeadModel state dict's weights (numpy arrays)."""
    model = nnx.eval_shape(lambda: GPT2LMHeadModel(config, scan_layers=scan_layers,
                                                   rngs=nnx.Rngs(0), **kwargs))
    return load(model, gpt2.params_from_hf(state_dict, config, scan_layers=scan_layers),
                LAYER_STACKS)
