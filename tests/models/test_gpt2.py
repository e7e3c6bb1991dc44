"""GPT-2 against HF's GPT2LMHeadModel on a tiny random config (float32, CPU)."""

import jax
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
    hf_logits,
    load,
)

from lora_jax.models import gpt2, registry
from lora_jax.models.stacking import stack_layers, unstack_layers


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_positions=32, n_embd=32, n_layer=3,
                                     n_head=4, initializer_range=0.2, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


IDS = np.random.RandomState(0).randint(0, 99, (2, 10))


def test_registry_and_paths(hf_model):
    assert registry.architecture("gpt2").module is gpt2
    _, params, _ = load(gpt2, hf_model)
    assert params["transformer"]["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 96)
    assert "lm_head" not in params  # tied to transformer.wte


def test_logits_match_hf(hf_model):
    diffs = check_parity(gpt2, hf_model, IDS)
    assert max(diffs.values()) <= TOL


def test_padded_logits_match_hf(hf_model):
    check_padded_parity(gpt2, hf_model, IDS)


def test_kv_cache_matches_full_forward(hf_model):
    for scan in (False, True):
        assert check_cache(gpt2, hf_model, IDS, prefill=6, scan_layers=scan) <= TOL


def test_stack_unstack_roundtrip(hf_model):
    _, params, _ = load(gpt2, hf_model)
    _, scanned, _ = load(gpt2, hf_model, scan_layers=True)
    stacked = stack_layers(params, "transformer.h")
    assert stacked["transformer"]["h"]["mlp"]["c_fc"]["kernel"].shape == (3, 32, 128)
    for a, b in zip(np.asarray(stacked["transformer"]["h"]["ln_1"]["scale"]),
                    np.asarray(scanned["transformer"]["h"]["ln_1"]["scale"]), strict=True):
        np.testing.assert_array_equal(a, b)
    back = unstack_layers(stacked, "transformer.h")
    assert sorted(back["transformer"]) == sorted(params["transformer"])
    np.testing.assert_array_equal(back["transformer"]["h_2"]["attn"]["c_proj"]["kernel"],
                                  params["transformer"]["h_2"]["attn"]["c_proj"]["kernel"])


def test_bad_weights_and_config(hf_model):
    check_bad_weights(gpt2, hf_model, "transformer.h.1.attn.c_attn.weight")
    with pytest.raises(ValueError, match="reorder_and_upcast_attn"):
        gpt2.config_from_hf({**hf_model.config.to_dict(), "reorder_and_upcast_attn": True})
    with pytest.raises(ValueError, match="unknown architecture 'gpt3'"):
        registry.architecture("gpt3")
    with pytest.raises(ValueError, match="remat_policy"):
        gpt2.build(gpt2.Config(n_layer=1), remat_policy="save_everything_please").init(
            jax.random.key(0), IDS)


def test_lora_counts_match_peft(hf_model):
    trainable, total = check_lora_counts(gpt2, hf_model, ["c_attn"], IDS)
    assert trainable == 3 * 4 * (32 + 96)
    assert hf_logits(hf_model, IDS).shape == (2, 10, 99)  # the HF model is left unadapted


def test_bfloat16(hf_model):
    check_bfloat16(gpt2, hf_model, IDS)
