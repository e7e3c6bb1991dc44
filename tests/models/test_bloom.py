"""BLOOM against HF's BloomForCausalLM on tiny random configs (float32, CPU): ALiBi (a power of
two and another head count), the fused head-interleaved query_key_value, both residual modes."""

import numpy as np
import pytest
import torch
import transformers
from causal_lm_checks import (
    TOL,
    check_bad_weights,
    check_bfloat16,
    check_cache,
    check_lora_counts,
    check_padded_parity,
    check_parity,
    load,
)
from peft_checks import perturb

from lora_jax.models import bloom, registry
from lora_jax.models.generate import generate

IDS = np.random.RandomState(0).randint(1, 99, (2, 10))


@pytest.fixture(scope="module", params=[(4, False), (6, True)], ids=["4heads", "6heads-postln"])
def hf_model(request):
    heads, post_ln = request.param
    torch.manual_seed(0)
    config = transformers.BloomConfig(
        vocab_size=99, hidden_size=8 * heads, n_layer=3, n_head=heads, initializer_range=0.2,
        apply_residual_connection_post_layernorm=post_ln, bos_token_id=0, eos_token_id=0)
    return perturb(transformers.BloomForCausalLM(config).eval(), r"layernorm|ln_f|bias$")


def test_registry_and_paths(hf_model):
    assert registry.architecture("bloom").module is bloom
    _, params, config = load(bloom, hf_model)
    qkv = params["transformer"]["h_0"]["self_attention"]["query_key_value"]
    assert qkv["kernel"].shape == (config.hidden_size, 3 * config.hidden_size)
    assert "word_embeddings_layernorm" in params["transformer"] and "lm_head" not in params


def test_alibi_slopes_match_hf():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    for heads in (4, 6, 12):
        ref = build_alibi_tensor(mask, heads, torch.float32).reshape(2, heads, 1, 5).numpy()
        ours = np.asarray(bloom.alibi_bias(mask.numpy(), heads))
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_logits_match_hf(hf_model):
    assert max(check_parity(bloom, hf_model, IDS).values()) <= TOL


def test_padded_logits_match_hf(hf_model):
    # ALiBi positions come from the mask (position_ids are unused by BLOOM).
    check_padded_parity(bloom, hf_model, IDS, position_ids=False)


def test_kv_cache_matches_full_forward(hf_model):
    for scan in (False, True):
        assert check_cache(bloom, hf_model, IDS, prefill=4, scan_layers=scan) <= TOL


def test_greedy_generate_matches_hf_left_padded(hf_model):
    model, params, _ = load(bloom, hf_model, scan_layers=True)
    mask = np.ones((2, 5), np.int64)
    mask[0, :2] = 0
    ids = np.where(mask == 1, IDS[:, :5], 0)
    ours = generate(model.apply, params, model, ids, 6, attention_mask=mask)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                                max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0)
    np.testing.assert_array_equal(ours, ref.numpy())


def test_bad_weights(hf_model):
    check_bad_weights(bloom, hf_model, "transformer.h.0.self_attention.query_key_value.weight")


def test_lora_counts_match_peft(hf_model):
    trainable, _ = check_lora_counts(bloom, hf_model, ["query_key_value"], IDS)
    d = hf_model.config.hidden_size
    assert trainable == 3 * 4 * (d + 3 * d)


def test_bfloat16(hf_model):
    check_bfloat16(bloom, hf_model, IDS)
