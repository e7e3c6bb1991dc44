"""Prompt-tuning: trainable soft-prompt vectors prepended to a model's input embeddings.

The model is not changed and needs no `inputs_embeds` argument: `wrap` prepends `n` placeholder
tokens to `input_ids` (and ones to `attention_mask`), and a Flax method interceptor replaces the
output of the word-embedding `nn.Embed` at those `n` positions with the prompt vectors. Everything
after the embedding lookup (position embeddings, LayerNorm, attention) then sees the prompt
exactly as peft's prompt-tuning feeds it through `inputs_embeds`.

    table = embed_table(params, "bert.embeddings.word_embeddings")
    prompt = init_prompt(jax.random.key(0), table, n_tokens=20)
    apply = wrap(model.apply, "bert.embeddings.word_embeddings", n_tokens=20)
    logits = apply({"params": params}, prompt, input_ids, attention_mask)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.core.targets import join_path


def init_prompt(key: jax.Array, embedding: jax.Array, n_tokens: int) -> jax.Array:
    """[n_tokens, D] float32 soft prompt, initialised as rows of `embedding` drawn at random
    (Lester et al., 2021: vocabulary initialisation trains better than random vectors)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens}")
    rows = jax.random.randint(key, (n_tokens,), 0, embedding.shape[0])
    return jnp.asarray(embedding[rows], jnp.float32)


def embed_table(params: Mapping[str, Any], embed_path: str) -> jax.Array:
    """The `embedding` table of the nn.Embed at the dotted `embed_path` in `params`."""
    node: Any = params
    for key in embed_path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"no module {embed_path!r} in the params (stopped at {key!r})")
        node = node[key]
    if "embedding" not in node:
        raise ValueError(f"{embed_path!r} is not an nn.Embed (no 'embedding' leaf)")
    return node["embedding"]


def wrap(apply_fn: Callable[..., Any], embed_path: str, n_tokens: int, pad_id: int = 0
         ) -> Callable[..., Any]:
    """`apply(variables, prompt, input_ids, attention_mask=None, **kwargs)`: `apply_fn` with the
    soft `prompt` [n_tokens, D] prepended to the inputs.

    `embed_path` is the dotted path of the word-embedding nn.Embed (e.g.
    `bert.embeddings.word_embeddings`, `model.embed_tokens`, `transformer.wte`). The output is
    the model's output for the `n_tokens + T` long sequence: for a causal LM drop the first
    `n_tokens` positions of the logits (see `strip`); a classifier's pooled output needs nothing.
    """

    def apply(variables: Mapping[str, Any], prompt: jax.Array, input_ids: jax.Array,
              attention_mask: jax.Array | None = None, *args: Any, **kwargs: Any) -> Any:
        if prompt.shape[0] != n_tokens:
            raise ValueError(f"prompt has {prompt.shape[0]} vectors, expected {n_tokens}")
        ids = jnp.pad(input_ids, ((0, 0), (n_tokens, 0)), constant_values=pad_id)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        mask = jnp.pad(attention_mask, ((0, 0), (n_tokens, 0)), constant_values=1)
        found = []

        def intercept(next_fun: Callable[..., Any], call_args: tuple[Any, ...],
                      call_kwargs: dict[str, Any], context: Any) -> Any:
            out = next_fun(*call_args, **call_kwargs)
            module = context.module
            if (context.method_name == "__call__" and isinstance(module, nn.Embed)
                    and module.scope is not None and join_path(module.path) == embed_path):
                found.append(True)
                soft = jnp.broadcast_to(prompt.astype(out.dtype), (out.shape[0], *prompt.shape))
                return jnp.concatenate([soft, out[:, n_tokens:]], axis=1)
            return out

        with nn.intercept_methods(intercept):
            result = apply_fn(variables, ids, mask, *args, **kwargs)
        if not found:
            raise ValueError(
                f"prompt tuning: the model never called an nn.Embed at {embed_path!r}; pass the "
                "path of its word-embedding layer"
            )
        return result

    return apply


def strip(logits: jax.Array, n_tokens: int) -> jax.Array:
    """A causal LM's per-position outputs without the `n_tokens` prompt positions."""
    return logits[:, n_tokens:]
