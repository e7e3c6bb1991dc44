"""Llama against HF's LlamaForCausalLM on tiny random configs (float32, CPU): grouped-query
attention, rotary embeddings, tied and untied heads."""

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
    perturb,
)

from lora_jax.models import llama, registry

IDS = np.random.RandomState(0).randint(0, 99, (2, 10))


def tiny(tie: bool) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        attention_bias=not tie)
    return perturb(transformers.LlamaForCausalLM(config).eval(), r"norm|bias$")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_model(request):
    return tiny(request.param)


def test_registry_and_paths(hf_model):
    assert registry.architecture("llama").module is llama
    _, params, config = load(llama, hf_model)
    attn = params["model"]["layers_0"]["self_attn"]
    assert attn["q_proj"]["kernel"].shape == (32, 32)
    assert attn["k_proj"]["kernel"].shape == (32, 16)  # 2 KV heads of 8
    assert ("lm_head" in params) == (not config.tie_word_embeddings)


def test_logits_match_hf(hf_model):
    assert max(check_parity(llama, hf_model, IDS).values()) <= TOL


def test_padded_logits_match_hf(hf_model):
    check_padded_parity(llama, hf_model, IDS)


def test_kv_cache_matches_full_forward(hf_model):
    for scan in (False, True):
        assert check_cache(llama, hf_model, IDS, prefill=5, scan_layers=scan) <= TOL


def test_bad_weights_and_config(hf_model):
    check_bad_weights(llama, hf_model, "model.layers.2.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        llama.config_from_hf({**hf_model.config.to_dict(),
                              "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        llama.config_from_hf({**hf_model.config.to_dict(), "hidden_act": "gelu"})


def test_lora_counts_match_peft(hf_model):
    trainable, _ = check_lora_counts(llama, hf_model, ["q_proj", "v_proj"], IDS)
    assert trainable == 3 * 4 * ((32 + 32) + (32 + 16))


def test_bfloat16(hf_model):
    check_bfloat16(llama, hf_model, IDS)
