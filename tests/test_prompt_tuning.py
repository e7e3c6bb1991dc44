"""lora_jax.train.prompt_tuning: soft prompts prepended through the word-embedding nn.Embed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.train import prompt_tuning

VOCAB, DIM, N_PROMPT = 50, 16, 4


class TinyEncoder(nn.Module):
    """BERT-shaped stand-in: word + position embeddings, a mixing layer, first-token classifier.
    `from_embeddings` is the `inputs_embeds` path the reference computation uses."""

    def setup(self):
        self.word_embeddings = nn.Embed(VOCAB, DIM)
        self.position_embeddings = nn.Embed(32, DIM)
        self.mix = nn.Dense(DIM)
        self.classifier = nn.Dense(3)

    def from_embeddings(self, x, attention_mask):
        x = x + self.position_embeddings(jnp.arange(x.shape[1]))[None]
        weights = attention_mask[..., None].astype(x.dtype)
        context = (x * weights).sum(1, keepdims=True) / weights.sum(1, keepdims=True)
        h = jnp.tanh(self.mix(x + context))
        return self.classifier(h[:, 0])

    def __call__(self, input_ids, attention_mask):
        return self.from_embeddings(self.word_embeddings(input_ids), attention_mask)


@pytest.fixture(scope="module")
def setup():
    model = TinyEncoder()
    ids = jax.random.randint(jax.random.key(0), (5, 7), 1, VOCAB)
    mask = jnp.ones_like(ids).at[:, 5:].set(0)
    params = model.init(jax.random.key(1), ids, mask)["params"]
    table = prompt_tuning.embed_table(params, "word_embeddings")
    prompt = prompt_tuning.init_prompt(jax.random.key(2), table, N_PROMPT)
    return model, params, ids, mask, prompt


def test_prompt_equals_prepending_input_embeddings(setup):
    model, params, ids, mask, prompt = setup
    apply = prompt_tuning.wrap(model.apply, "word_embeddings", N_PROMPT)
    got = apply({"params": params}, prompt, ids, mask)
    embeds = jnp.concatenate([jnp.broadcast_to(prompt, (5, N_PROMPT, DIM)),
                              params["word_embeddings"]["embedding"][ids]], axis=1)
    full_mask = jnp.concatenate([jnp.ones((5, N_PROMPT), mask.dtype), mask], axis=1)
    want = model.apply({"params": params}, embeds, full_mask, method=TinyEncoder.from_embeddings)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32, same ops
    # The prompt matters: a different prompt changes the output.
    other = apply({"params": params}, prompt + 1.0, ids, mask)
    assert np.abs(np.asarray(other - got)).max() > 1e-3


def test_init_prompt_draws_vocabulary_rows(setup):
    _, params, _, _, prompt = setup
    table = np.asarray(params["word_embeddings"]["embedding"])
    assert prompt.shape == (N_PROMPT, DIM) and prompt.dtype == jnp.float32
    for row in np.asarray(prompt):
        assert np.isclose(table, row).all(axis=1).any()
    with pytest.raises(ValueError, match="positive integer"):
        prompt_tuning.init_prompt(jax.random.key(0), table, 0)


def test_training_the_prompt_lowers_the_loss(setup):
    model, params, ids, mask, prompt = setup
    apply = prompt_tuning.wrap(model.apply, "word_embeddings", N_PROMPT)
    labels = jnp.full(5, 2)  # one shared prompt can steer every example to one class

    def loss(p):
        logits = apply({"params": params}, p, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tx = optax.adam(5e-2)
    state, p = tx.init(prompt), prompt
    first = loss(p)
    for _ in range(30):
        grads = jax.grad(loss)(p)
        updates, state = tx.update(grads, state)
        p = optax.apply_updates(p, updates)
    assert loss(p) < 0.5 * first


def test_wrong_embedding_path_is_a_clear_error(setup):
    model, params, ids, mask, prompt = setup
    apply = prompt_tuning.wrap(model.apply, "embed_tokens", N_PROMPT)
    with pytest.raises(ValueError, match="never called an nn.Embed at 'embed_tokens'"):
        apply({"params": params}, prompt, ids, mask)
    with pytest.raises(ValueError, match="expected 4"):
        prompt_tuning.wrap(model.apply, "word_embeddings", N_PROMPT)(
            {"params": params}, prompt[:2], ids, mask)
    with pytest.raises(ValueError, match="no module 'bert.embeddings.word_embeddings'"):
        prompt_tuning.embed_table(params, "bert.embeddings.word_embeddings")


def test_strip_drops_prompt_positions():
    logits = jnp.arange(2 * 6 * 3).reshape(2, 6, 3)
    assert prompt_tuning.strip(logits, 4).shape == (2, 2, 3)
    np.testing.assert_array_equal(prompt_tuning.strip(logits, 4), logits[:, 4:])
