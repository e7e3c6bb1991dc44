"""`generate` with the KV cache: HF greedy parity, LoRA through `wrap` vs merged params, sampling
filters and reproducibility, EOS handling (tiny random models, float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from causal_lm_checks import load

import lora_jax
from lora_jax.models import gpt2, llama
from lora_jax.models.generate import filter_logits, generate

PROMPT = np.random.RandomState(1).randint(1, 99, (2, 5))


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0)).eval()


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture(scope="module", params=[(gpt2, tiny_gpt2), (llama, tiny_llama)],
                ids=["gpt2", "llama"])
def models(request):
    arch, make = request.param
    hf_model = make()
    model, params, _ = load(arch, hf_model, scan_layers=True)
    return hf_model, model, params


def hf_greedy(hf_model, ids, mask, n):
    out = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)
    return out.numpy()


def test_greedy_equals_hf(models):
    hf_model, model, params = models
    mask = np.ones_like(PROMPT)
    ours = generate(model.apply, params, model, PROMPT, 8)
    np.testing.assert_array_equal(ours, hf_greedy(hf_model, PROMPT, mask, 8))
    # Left-padded batch: row 0 has a 2-token prompt.
    mask[0, :3] = 0
    ids = np.where(mask == 1, PROMPT, 0)
    ours = generate(model.apply, params, model, ids, 8, attention_mask=mask)
    np.testing.assert_array_equal(ours, hf_greedy(hf_model, ids, mask, 8))


def random_adapter(model, params, targets):
    config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    adapted = lora_jax.inject(params, config, jax.random.key(0),
                              layouts=lora_jax.layouts(model, PROMPT))
    # Non-zero B, so that the adapter changes the model.
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapted)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapted = jax.tree_util.tree_unflatten(tree, [
        jax.random.normal(k, x.shape) if "lora_B" in jax.tree_util.keystr(p) else x
        for (p, x), k in zip(leaves, keys, strict=True)])
    return config, adapted


def test_wrap_unmerged_equals_merged(models):
    _, model, params = models
    targets = ["c_attn"] if isinstance(model, gpt2.GPT2LMHeadModel) else ["q_proj", "v_proj"]
    config, adapted = random_adapter(model, params, targets)
    wrapped = lora_jax.wrap(model.apply, config)
    merged = lora_jax.merge(adapted, config)
    ours = generate(wrapped, adapted, model, PROMPT, 8)
    np.testing.assert_array_equal(ours, generate(model.apply, merged, model, PROMPT, 8))
    full = wrapped({"params": adapted}, ours)
    assert np.abs(full - model.apply({"params": params}, ours)).max() > 0.1  # adapter matters


@pytest.mark.parametrize("top_k,top_p", [(5, None), (8, 0.7)])
def test_sampling_reproducible_and_filtered(models, top_k, top_p):
    _, model, params = models
    kw = dict(temperature=1.5, top_k=top_k, top_p=top_p)
    a = generate(model.apply, params, model, PROMPT, 8, key=jax.random.key(7), **kw)
    b = generate(model.apply, params, model, PROMPT, 8, key=jax.random.key(7), **kw)
    c = generate(model.apply, params, model, PROMPT, 8, key=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    logits = model.apply({"params": params}, a)[:, PROMPT.shape[1] - 1:-1] / 1.5
    allowed = np.asarray(filter_logits(logits, top_k=top_k, top_p=top_p)) > jnp.finfo(
        jnp.float32).min
    chosen = np.take_along_axis(allowed, np.asarray(a[:, PROMPT.shape[1]:, None]), axis=-1)
    assert chosen.all()
    assert allowed.sum(-1).max() < 99  # the filter did remove tokens


def test_filter_logits():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: (np.asarray(filter_logits(logits, **kw)) > -1e30).tolist()
    assert kept(top_k=2) == [[True, True, False, False]]
    assert kept(top_p=0.5) == [[True, False, False, False]]
    assert kept(top_p=0.8) == [[True, True, False, False]]
    assert kept(top_p=0.81) == [[True, True, True, False]]
    assert kept(top_k=1, top_p=1.0) == [[True, False, False, False]]


def test_eos_pads_and_stops(models):
    _, model, params = models
    greedy = np.asarray(generate(model.apply, params, model, PROMPT, 8))
    eos = int(greedy[0, PROMPT.shape[1] + 2])  # the third generated token of row 0
    out = np.asarray(generate(model.apply, params, model, PROMPT, 8, eos_token_id=eos,
                              pad_token_id=-1))
    first = PROMPT.shape[1] + list(greedy[0, PROMPT.shape[1]:]).index(eos)
    np.testing.assert_array_equal(out[0, :first + 1], greedy[0, :first + 1])
    assert (out[0, first + 1:] == -1).all()


def test_bad_arguments(models):
    _, model, params = models
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model.apply, params, model, PROMPT, 4, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model.apply, params, model, PROMPT, 4, temperature=1.0, top_p=0.0,
                 key=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model.apply, params, model, PROMPT, 0)
