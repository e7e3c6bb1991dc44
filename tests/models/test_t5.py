"""T5 against HF's T5ForConditionalGeneration on tiny random configs (float32, CPU): logits with
padded encoder/decoder masks for the relu and gated-gelu variants, every scan/remat variant, the
untied head, layout conversion, bad weights, and LoRA on encoder q/v counted as peft does."""

import jax
import numpy as np
import pytest
import torch
import transformers
from causal_lm_checks import TOL, VARIANTS, check_bad_weights, state_dict

import lora_jax
from lora_jax.models import registry, t5

RNG = np.random.RandomState(0)
# 20 tokens > relative_attention_max_distance: exact, log-spaced and clamped buckets all occur.
IDS = RNG.randint(0, 99, (2, 20))
MASK = np.ones_like(IDS)
MASK[1, 12:] = 0
DEC = RNG.randint(0, 99, (2, 9))
DEC_MASK = np.ones_like(DEC)
DEC_MASK[0, 6:] = 0


def make_hf(feed_forward_proj: str, **kwargs) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=99, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj=feed_forward_proj, **kwargs)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=["relu", "gated-gelu"])
def hf_model(request):
    return make_hf(request.param)


def load(hf_model, scan_layers=False, remat_policy=None, hf_config=None):
    config = t5.config_from_hf(hf_config or hf_model.config.to_dict())
    model = t5.build(config, scan_layers=scan_layers, remat_policy=remat_policy)
    return model, t5.params_from_hf(state_dict(hf_model), config, scan_layers=scan_layers)


def hf_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                        decoder_input_ids=torch.tensor(DEC),
                        decoder_attention_mask=torch.tensor(DEC_MASK)).logits.numpy()


def test_registry_and_paths(hf_model):
    assert registry.architecture("t5").module is t5
    _, params = load(hf_model)
    gated = hf_model.config.is_gated_act
    ff = params["decoder"]["block_2"]["layer_2"]["DenseReluDense"]
    assert set(ff) == ({"wi_0", "wi_1", "wo"} if gated else {"wi", "wo"})
    attn = params["encoder"]["block_0"]["layer_0"]["SelfAttention"]
    assert attn["relative_attention_bias"]["embedding"].shape == (8, 4)
    assert "relative_attention_bias" not in params["encoder"]["block_1"]["layer_0"]["SelfAttention"]
    assert params["decoder"]["block_1"]["layer_1"]["EncDecAttention"]["q"]["kernel"].shape == \
        (16, 16)
    assert set(params) == {"shared", "encoder", "decoder"}  # the head is tied


def test_logits_match_hf(hf_model):
    ref = hf_logits(hf_model)
    valid = DEC_MASK.astype(bool)
    assert np.abs(ref[valid]).max() > 0.5
    diffs = {}
    for scan, remat in VARIANTS:
        model, params = load(hf_model, scan, remat)
        out = model.apply({"params": params}, IDS, MASK, DEC, DEC_MASK)
        diffs[scan, remat] = float(np.abs(np.asarray(out) - ref)[valid].max())
    assert max(diffs.values()) <= TOL, diffs


def test_untied_head_and_no_rescale():
    """transformers 5 always ties T5's head, keeping the old flag as `scale_decoder_outputs`;
    an old-style config (`tie_word_embeddings=False`) gets a separate `lm_head`, no rescale."""
    hf_model = make_hf("gated-gelu", tie_word_embeddings=False)
    assert hf_model.config.scale_decoder_outputs is False
    ref = hf_logits(hf_model)
    valid = DEC_MASK.astype(bool)
    model, params = load(hf_model)  # tied, not rescaled
    assert "lm_head" not in params
    assert np.abs(model.apply({"params": params}, IDS, MASK, DEC, DEC_MASK) - ref)[valid].max() \
        <= TOL
    legacy = {**hf_model.config.to_dict(), "tie_word_embeddings": False}
    del legacy["scale_decoder_outputs"]
    config = t5.config_from_hf(legacy)
    assert not config.tie_word_embeddings and not config.rescale
    weights = {**state_dict(hf_model), "lm_head.weight": state_dict(hf_model)["shared.weight"]}
    params = t5.params_from_hf(weights, config)
    out = t5.build(config).apply({"params": params}, IDS, MASK, DEC, DEC_MASK)
    assert params["lm_head"]["kernel"].shape == (16, 99)
    assert np.abs(out - ref)[valid].max() <= TOL
    del weights["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing: \['lm_head.weight'\]"):
        t5.params_from_hf(weights, config)


def test_stack_unstack_params(hf_model):
    _, params = load(hf_model)
    _, scanned = load(hf_model, scan_layers=True)
    assert scanned["encoder"]["relative_attention_bias"]["embedding"].shape == (8, 4)
    assert scanned["decoder"]["block"]["layer_1"]["EncDecAttention"]["k"]["kernel"].shape == \
        (3, 16, 16)
    stacked = t5.stack_params(params)
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(scanned)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stacked, scanned)
    back = t5.unstack_params(scanned)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_bad_weights_and_config(hf_model):
    check_bad_weights(t5, hf_model, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
                                    ".weight")
    check_bad_weights(t5, hf_model, "decoder.block.2.layer.1.EncDecAttention.o.weight")
    with pytest.raises(ValueError, match="must be '<act>' or 'gated-<act>'"):
        t5.config_from_hf({**hf_model.config.to_dict(), "feed_forward_proj": "double-gated-gelu"})
    with pytest.raises(ValueError, match="is_decoder"):
        t5.config_from_hf({**hf_model.config.to_dict(), "is_decoder": True})
    model, params = load(hf_model)
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model.apply({"params": params}, IDS)


def test_lora_on_encoder_q_v_counts_match_peft():
    """The seed's T5 use case: adapters on the encoder's q and v only."""
    import peft

    hf_model = make_hf("relu")
    kwargs = dict(r=4, lora_alpha=16, target_modules=r".*encoder.*\.(q|v)")
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(**kwargs))
    expected = peft_model.get_nb_trainable_parameters()
    adapted_names = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    peft_model.unload()
    assert len(adapted_names) == 2 * 2 and all(".encoder." in n for n in adapted_names)
    config = lora_jax.LoraConfig(**kwargs)
    for scan in (False, True):
        model, params = load(hf_model, scan)
        layouts = lora_jax.layouts(model, IDS, decoder_input_ids=DEC) if scan else None
        adapted = lora_jax.inject(params, config, jax.random.key(0), layouts=layouts)
        assert lora_jax.count_parameters(adapted, config) == expected, scan
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(adapted)[0] if "lora_A" in str(p)]
        assert paths and all("'encoder'" in p and "SelfAttention" in p for p in paths)
        out = lora_jax.wrap(model.apply, config)({"params": adapted}, IDS, MASK, DEC)
        np.testing.assert_allclose(out, model.apply({"params": params}, IDS, MASK, DEC),
                                   atol=1e-6)
