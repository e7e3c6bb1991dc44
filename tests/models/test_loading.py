"""`from_torch`, `from_pretrained` and `load_tokenizer` on tiny random HF models (float32, CPU):
folders written by HF's `save_pretrained` (single file and sharded) load to the same params as
`from_torch`, outputs equal HF's, and every kind of bad folder is an error naming the culprit."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from causal_lm_checks import TOL

from lora_jax.models import from_pretrained, from_torch, load_tokenizer

IDS = np.random.RandomState(0).randint(0, 99, (2, 7))


def tiny(name: str) -> torch.nn.Module:
    """A tiny random HF model of each class `from_torch` supports (seeded)."""
    torch.manual_seed(0)
    t = transformers
    bert = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=32, initializer_range=0.2)
    models = {
        "BertModel": lambda: t.BertModel(t.BertConfig(**bert)),
        "BertForSequenceClassification": lambda: t.BertForSequenceClassification(
            t.BertConfig(**bert, num_labels=3)),
        "GPT2LMHeadModel": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=99, n_positions=32, n_embd=16, n_layer=2, n_head=2,
            initializer_range=0.2)),
        "LlamaForCausalLM": lambda: t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)),
        "BloomForCausalLM": lambda: t.BloomForCausalLM(t.BloomConfig(
            vocab_size=99, hidden_size=16, n_layer=2, n_head=4, initializer_range=0.2)),
        "T5ForConditionalGeneration": lambda: t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=99, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)),
    }
    return models[name]().eval()


def run_both(hf_model, module, params) -> tuple[np.ndarray, np.ndarray]:
    """(ours, HF's) main output on IDS."""
    kwargs = {"decoder_input_ids": IDS[:, :5]} if hf_model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = hf_model(torch.tensor(IDS), **{k: torch.tensor(v) for k, v in kwargs.items()})
    ref = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    ours = module.apply({"params": params}, IDS, **kwargs)
    return np.asarray(ours[0] if isinstance(ours, tuple) else ours), ref.numpy()


def assert_same_tree(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification",
                                  "GPT2LMHeadModel", "LlamaForCausalLM", "BloomForCausalLM",
                                  "T5ForConditionalGeneration"])
def test_from_torch_and_from_pretrained_match_hf(name, tmp_path):
    hf_model = tiny(name)
    module, params = from_torch(hf_model)
    ours, ref = run_both(hf_model, module, params)
    assert np.abs(ours - ref).max() <= TOL
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded_module, loaded = from_pretrained(tmp_path)
    assert loaded_module == module
    assert_same_tree(loaded, params)


def test_sharded_folder_scan_and_dtypes(tmp_path):
    hf_model = tiny("BertForSequenceClassification")
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="8KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
    _, params = from_torch(hf_model)
    assert_same_tree(from_pretrained(tmp_path)[1], params)
    module, scanned = from_pretrained(tmp_path, scan_layers=True, remat_policy="dots_saveable")
    assert scanned["bert"]["encoder"]["layer"]["attention"]["self"]["query"]["kernel"].shape == \
        (2, 16, 16)
    ours, ref = run_both(hf_model, module, scanned)
    assert np.abs(ours - ref).max() <= TOL
    module, half = from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    assert module.apply({"params": half}, IDS).dtype == jnp.bfloat16


def test_bfloat16_checkpoint(tmp_path):
    hf_model = tiny("BertModel")
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    _, params = from_pretrained(tmp_path)
    hf_model.float()
    _, ref = from_torch(hf_model)  # bf16 values converted exactly to float32
    assert_same_tree(params, ref)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A BertForSequenceClassification folder (single file) and its tensors."""
    path = tmp_path_factory.mktemp("bert")
    tiny("BertForSequenceClassification").save_pretrained(path, safe_serialization=True)
    return path, safetensors.numpy.load_file(path / "model.safetensors")


def broken_copy(saved, tmp_path, tensors=None, config=None):
    """A copy of the saved folder with other tensors and/or config.json edits."""
    src, original = saved
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    if tensors is not None:
        safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors",
                                    metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **config}))
    return tmp_path


NAME = "bert.encoder.layer.1.attention.self.value.weight"


@pytest.mark.parametrize("case, pattern", [
    ("unknown_type", r"unknown architecture 'mamba9'"),
    ("unknown_class", r"HF class 'BertForMaskedLM' is not supported for model_type 'bert'"),
    ("missing", rf"missing: \['{NAME}'\]"),
    ("extra", r"unexpected: \['bert.extra.weight'\]"),
    ("shape", rf"wrong shape: \['{NAME}: got \(15, 16\), expected \(16, 16\)"),
    ("truncated", r"cannot read safetensors file .*model.safetensors \(truncated or corrupt\?\)"),
    ("no_weights", r"has neither model.safetensors nor model.safetensors.index.json"),
    ("bad_config", r"config.json is not valid JSON"),
])
def test_bad_folders_name_the_culprit(saved, tmp_path, case, pattern):
    tensors = dict(saved[1])
    if case == "unknown_type":
        path = broken_copy(saved, tmp_path, config={"model_type": "mamba9"})
    elif case == "unknown_class":
        path = broken_copy(saved, tmp_path, config={"architectures": ["BertForMaskedLM"]})
    elif case == "missing":
        path = broken_copy(saved, tmp_path, {k: v for k, v in tensors.items() if k != NAME})
    elif case == "extra":
        path = broken_copy(saved, tmp_path, {**tensors, "bert.extra.weight": np.zeros(2)})
    elif case == "shape":
        path = broken_copy(saved, tmp_path, {**tensors, NAME: tensors[NAME][:, :-1]})
    else:
        path = broken_copy(saved, tmp_path)
        file = path / ("config.json" if case == "bad_config" else "model.safetensors")
        if case == "no_weights":
            file.unlink()
        else:
            data = file.read_bytes()
            file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=pattern):
        from_pretrained(path)


def test_sharded_index_errors(tmp_path):
    tiny("BertModel").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="8KB")
    index = tmp_path / "model.safetensors.index.json"
    spec = json.loads(index.read_text())
    shard = spec["weight_map"]["pooler.dense.weight"]
    spec["weight_map"]["pooler.ghost.weight"] = shard
    index.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"{shard} lacks the tensors \['pooler.ghost.weight'\]"):
        from_pretrained(tmp_path)
    del spec["weight_map"]["pooler.ghost.weight"]
    index.write_text(json.dumps(spec))
    (tmp_path / shard).unlink()
    with pytest.raises(ValueError, match=rf"safetensors file .*{shard} does not exist"):
        from_pretrained(tmp_path)


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert load_tokenizer(path).encode("hello big world").ids == [1, 0, 2]
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match=r"no tokenizer file .*bad/tokenizer.json"):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read tokenizer .*bad/tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


@pytest.mark.parametrize("name, kind, scan", [("LlamaForCausalLM", "nf4", True),
                                              ("BertForSequenceClassification", "int8", False)])
def test_quantizing_on_load_equals_quantizing_after(name, kind, scan, tmp_path):
    """`from_pretrained(..., quantize=)` reads tensor by tensor into the tree that
    `lora_jax.quantize` makes of the float load (bit for bit; the classifier stays float)."""
    import lora_jax

    hf_model = tiny(name)
    if name.startswith("Llama"):  # NF4's blocks of 64 must divide each kernel
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    _, floats = from_pretrained(tmp_path, scan_layers=scan, param_dtype=jnp.bfloat16)
    _, on_load = from_pretrained(tmp_path, scan_layers=scan, param_dtype=jnp.bfloat16,
                                 quantize=kind)
    after = lora_jax.quantize(floats, kind)
    assert_same_tree(on_load, after)
    with pytest.raises(ValueError, match="kind must be one of"):
        from_pretrained(tmp_path, quantize="nf2")
