"""`save_hf` is the inverse of `from_pretrained`: for every architecture, a folder it writes
loads back to the same params, and transformers' PyTorch class reads it to the same outputs as
lora_jax's module on those params (float32, 1e-4)."""

import json

import jax
import numpy as np
import pytest

from lora_jax.models import from_pretrained, load_tokenizer, save_hf

ARCHITECTURES = ["tiny_gpt2", "tiny_bert", "tiny_llama", "tiny_bloom", "tiny_t5"]


def _outputs(module, params, ids):
    kw = {"decoder_input_ids": ids[:, :5]} if "T5" in type(module).__name__ else {}
    out = module.apply({"params": params}, ids, **kw)
    return np.asarray(out[0] if isinstance(out, tuple) else out)  # BertModel: (hidden, pooled)


def _torch_outputs(folder, ids):
    import torch
    import transformers

    config = json.loads((folder / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
    kw = {"decoder_input_ids": torch.as_tensor(ids[:, :5])} if config["model_type"] == "t5" \
        else {}
    with torch.no_grad():
        out = model(torch.as_tensor(ids), **kw)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()


@pytest.mark.parametrize("fixture", ARCHITECTURES)
def test_save_hf_round_trips_through_from_pretrained_and_transformers(fixture, request,
                                                                      tmp_path):
    folder = request.getfixturevalue(fixture)
    module, params = from_pretrained(folder)
    # Changed weights (so a folder that merely copies the original cannot pass), as a merge
    # would change them.
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(params))))
    changed = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    out = tmp_path / "saved"
    save_hf(out, module, changed, hf_config=json.loads((folder / "config.json").read_text()),
            tokenizer=load_tokenizer(folder))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]

    again_module, again = from_pretrained(out)
    assert type(again_module) is type(module)
    assert jax.tree.structure(again) == jax.tree.structure(changed)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(changed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    ids = np.arange(1, 9, dtype=np.int64)[None] * 37
    want = _outputs(module, changed, ids.astype(np.int32))
    np.testing.assert_allclose(_torch_outputs(out, ids), want, atol=1e-4, rtol=1e-4)
    assert np.abs(_outputs(module, params, ids.astype(np.int32)) - want).max() > 1e-3


def test_save_hf_without_a_config_writes_the_modules_own(tiny_llama, tmp_path):
    """What `lora-jax merge` does for a GGUF base (no config.json to copy)."""
    module, params = from_pretrained(tiny_llama)
    save_hf(tmp_path / "saved", module, params)
    ids = np.arange(1, 9, dtype=np.int64)[None] * 37
    np.testing.assert_allclose(_torch_outputs(tmp_path / "saved", ids),
                               _outputs(module, params, ids.astype(np.int32)), atol=1e-4)


def test_save_hf_refuses_what_it_cannot_write(tiny_llama, tmp_path):
    import flax.linen as nn

    with pytest.raises(ValueError, match="not Dense"):
        save_hf(tmp_path / "x", nn.Dense(2), {})
    module, params = from_pretrained(tiny_llama, scan_layers=True)
    with pytest.raises(ValueError, match="load the model with scan_layers=False"):
        save_hf(tmp_path / "x", module, params)
    assert not (tmp_path / "x").exists()
