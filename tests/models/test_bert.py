"""BERT against HF's BertModel / BertForSequenceClassification on a tiny random config (float32,
CPU): hidden states, pooler and logits with a padded attention_mask and token types, every
scan/remat variant; bad weights; LoRA parameter counts equal peft's."""

import jax
import numpy as np
import pytest
import torch
import transformers
from causal_lm_checks import TOL, VARIANTS, check_bad_weights, state_dict

import lora_jax
from lora_jax.models import bert, registry

IDS = np.random.RandomState(0).randint(0, 99, (3, 11))
MASK = np.ones_like(IDS)
MASK[1, 6:] = 0  # right padding
MASK[2, 3:] = 0
TYPES = np.zeros_like(IDS)
TYPES[:, 5:] = 1


def hf_config(**kwargs) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, intermediate_size=37,
                                   max_position_embeddings=64, initializer_range=0.2, **kwargs)


@pytest.fixture(scope="module")
def hf_base():
    torch.manual_seed(0)
    return transformers.BertModel(hf_config()).eval()


@pytest.fixture(scope="module")
def hf_classifier():
    torch.manual_seed(1)
    return transformers.BertForSequenceClassification(hf_config(num_labels=3)).eval()


def load(hf_model, task, scan_layers=False, remat_policy=None):
    config = bert.config_from_hf(hf_model.config.to_dict())
    model = bert.build(config, task=task, scan_layers=scan_layers, remat_policy=remat_policy)
    return model, bert.params_from_hf(state_dict(hf_model), config, task=task,
                                      scan_layers=scan_layers)


def hf_outputs(hf_model):
    with torch.no_grad():
        return hf_model(torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                        token_type_ids=torch.tensor(TYPES))


def test_registry_and_paths(hf_base, hf_classifier):
    assert registry.architecture("bert").module is bert
    _, params = load(hf_base, "base")
    assert params["encoder"]["layer_2"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
    assert params["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape == (32, 37)
    _, params = load(hf_classifier, "classify", scan_layers=True)
    assert params["bert"]["encoder"]["layer"]["output"]["dense"]["kernel"].shape == (3, 37, 32)
    assert params["classifier"]["kernel"].shape == (32, 3)


def test_hidden_states_match_hf(hf_base):
    ref = hf_outputs(hf_base)
    hidden, pooled = ref.last_hidden_state.numpy(), ref.pooler_output.numpy()
    diffs = {}
    for scan, remat in VARIANTS:
        model, params = load(hf_base, "base", scan, remat)
        out_h, out_p = model.apply({"params": params}, IDS, MASK, TYPES)
        # Padded positions too: their queries still attend to the unpadded keys, as in HF.
        diffs[scan, remat] = max(np.abs(out_h - hidden).max(), np.abs(out_p - pooled).max())
    assert max(diffs.values()) <= TOL, diffs


def test_padding_is_masked(hf_base):
    """Changing padded tokens leaves the unpadded positions' states unchanged."""
    model, params = load(hf_base, "base")
    other = np.where(MASK == 1, IDS, (IDS + 7) % 99)
    a, _ = model.apply({"params": params}, IDS, MASK)
    b, _ = model.apply({"params": params}, other, MASK)
    valid = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-6)
    assert np.abs(np.asarray(a) - np.asarray(b))[~valid].max() > 1e-2


def test_classification_logits_match_hf(hf_classifier):
    ref = hf_outputs(hf_classifier).logits.numpy()
    assert np.abs(ref).max() > 0.1
    for scan, remat in VARIANTS:
        model, params = load(hf_classifier, "classify", scan, remat)
        diff = np.abs(model.apply({"params": params}, IDS, MASK, TYPES) - ref).max()
        assert diff <= TOL, (scan, remat, diff)


def test_mean_pool():
    hidden = np.random.RandomState(0).randn(2, 4, 5).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = np.asarray(bert.mean_pool(hidden, mask))
    expected = hidden[0, :2].mean(0)
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-6)
    raw = np.asarray(bert.mean_pool(hidden, mask, normalize=False))
    np.testing.assert_allclose(raw[1], hidden[1].mean(0), rtol=1e-6)


def test_bad_weights_and_config(hf_base):
    check_bad_weights(bert, hf_base, "encoder.layer.1.attention.self.value.weight")
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.config_from_hf({**hf_base.config.to_dict(), "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="unsupported activation 'swish2'"):
        bert.config_from_hf({**hf_base.config.to_dict(), "hidden_act": "swish2"})
    with pytest.raises(ValueError, match="task='base' or 'classify'"):
        bert.build(bert.Config(), task="causal_lm")


def peft_counts(hf_model, **kwargs) -> tuple[int, int]:
    import peft

    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(**kwargs))
    counts = peft_model.get_nb_trainable_parameters()
    peft_model.unload()  # the fixture is reused unadapted
    return counts


@pytest.mark.parametrize("save", [None, ["classifier"]])
def test_lora_counts_match_peft(hf_classifier, save):
    """query/value adapters (and a fully trained classifier): peft's (trainable, total); the
    total counts the saved classifier's frozen original, as peft's does."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=save)
    trainable, total = peft_counts(hf_classifier, **kwargs)
    config = lora_jax.LoraConfig(**kwargs)
    for scan in (False, True):
        model, params = load(hf_classifier, "classify", scan)
        layouts = lora_jax.layouts(model, IDS) if scan else None
        adapted = lora_jax.inject(params, config, jax.random.key(0), layouts=layouts)
        assert lora_jax.count_parameters(adapted, config) == (trainable, total), scan
        out = lora_jax.wrap(model.apply, config)({"params": adapted}, IDS, MASK)
        np.testing.assert_allclose(out, model.apply({"params": params}, IDS, MASK), atol=1e-6)
