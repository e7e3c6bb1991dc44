"""Bad peft adapters: each raises a ValueError that names the problem, and the base params tree
is never modified. Files are made by real peft on a tiny GPT-2, then edited."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft_checks import base_params, load_peft, peft_adapter, save_peft
from safetensors.torch import load_file, save_file
from test_peft_io import gpt2_hf

import lora_jax
from lora_jax.models import gpt2

PREFIX = "base_model.model.transformer."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    hf = gpt2_hf()
    _, base = base_params(gpt2, hf)
    peft_adapter(hf, str(path), r=4, target_modules=["c_attn"])
    return path, base


def edited(src, dst, tensors=None, config=None):
    """A copy of the adapter at `src` in `dst` with `tensors(dict)` / `config(dict)` applied."""
    dst.mkdir()
    weights = load_file(src / "adapter_model.safetensors")
    fields = json.loads((src / "adapter_config.json").read_text())
    if tensors:
        tensors(weights)
    if config:
        config(fields)
    save_file(weights, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(fields))
    return dst


def rename(old, new):
    return lambda w: w.__setitem__(new, w.pop(old))


CASES = {
    "unknown module": (dict(tensors=rename(PREFIX + "h.1.attn.c_attn.lora_A.weight",
                                           PREFIX + "h.7.attn.c_attn.lora_A.weight")),
                       r"h\.7\.attn\.c_attn\.lora_A\.weight'.*not in the params tree.*closest"),
    "missing key": (dict(tensors=lambda w: w.pop(PREFIX + "h.0.attn.c_attn.lora_B.weight")),
                    r"missing key '.*h\.0\.attn\.c_attn\.lora_B\.weight'"),
    "wrong shape": (dict(tensors=lambda w: w.__setitem__(PREFIX + "h.0.attn.c_attn.lora_A.weight",
                                                         torch.zeros(4, 31))),
                    r"h\.0\.attn\.c_attn\.lora_A\.weight' \(4, 31\).*do not fit.*\[r, 32\]"),
    "rank differs from config": (dict(config=lambda c: c.update(r=8)),
                                 r"has rank 4, but the config gives .*h\.0\.attn\.c_attn' r=8"),
    "not a LoRA key": (dict(tensors=lambda w: w.__setitem__(PREFIX + "h.0.attn.c_attn.foo",
                                                            torch.zeros(3))),
                       r"h\.0\.attn\.c_attn\.foo' is not a LoRA factor"),
    "untargeted module": (dict(config=lambda c: c.update(target_modules=["h.0.attn.c_attn"])),
                          r"h\.1\.attn\.c_attn\.lora_A\.weight' adapts .* does not select"),
    "bias without bias config": (dict(tensors=lambda w: w.__setitem__(
        PREFIX + "h.0.attn.c_attn.base_layer.bias", torch.zeros(96))), r"bias is 'none'"),
    "IA3": (dict(config=lambda c: c.update(peft_type="IA3")),
            r"peft_type is 'IA3'; lora_jax loads peft_type \[.*'LORA'"),
    "DoRA without magnitude": (dict(config=lambda c: c.update(use_dora=True)),
                               r"missing key '.*lora_magnitude_vector' \(the config"),
    "lora_bias": (dict(config=lambda c: c.update(lora_bias=True)),
                  r"lora_bias=True is not supported"),
    "PiSSA": (dict(config=lambda c: c.update(init_lora_weights="pissa")),
              r"init_lora_weights='pissa' trains against modified base weights"),
    "regex with layers_to_transform": (
        dict(config=lambda c: c.update(target_modules=".*c_attn", layers_to_transform=[0])),
        r"layers_to_transform cannot be used with a str \(regex or 'all-linear'\) target_modules"),
    "r = 0": (dict(config=lambda c: c.update(r=0)),
              r"invalid LoraConfig: LoraConfig.r must be a positive integer, got 0"),
    "layers_pattern alone": (dict(config=lambda c: c.update(layers_pattern="h")),
                             r"layers_pattern needs layers_to_transform"),
    "unknown task_type": (dict(config=lambda c: c.update(task_type="CLS")),
                          r"LoraConfig.task_type must be one of SEQ_CLS, .*got 'CLS'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_adapter_raises_and_leaves_base_alone(adapter, tmp_path, case):
    src, base = adapter
    edit, message = CASES[case]
    before = jax.tree.map(np.array, base)
    with pytest.raises(ValueError, match=message):
        load_peft(edited(src, tmp_path / "bad", **edit), base)
    assert jax.tree.structure(base) == jax.tree.structure(before)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base),
                                                    jax.tree.leaves(before), strict=True))


def test_missing_files_and_existing_factors(adapter, tmp_path):
    src, base = adapter
    with pytest.raises(ValueError, match=r"no '.*adapter_config.json'"):
        load_peft(tmp_path, base)
    params, _ = load_peft(src, base)
    with pytest.raises(ValueError, match=r"'transformer.h_0.attn.c_attn' already has LoRA"):
        load_peft(src, params)


def test_scanned_needs_stacks(tmp_path):
    hf = gpt2_hf()
    _, scanned = base_params(gpt2, hf, scan_layers=True)
    peft_adapter(hf, str(tmp_path), r=4, target_modules=["c_attn"],
                 rank_pattern={"h.1.attn.c_attn": 2})
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn'.*not in the params tree.*"
                                         r"model_type="):
        load_peft(tmp_path, scanned)
    # Per-layer ranks load into one stack, padded to the largest (test_peft_parity class 9).
    params, _ = load_peft(tmp_path, scanned, model_type="gpt2")
    node = params["transformer"]["h"]["attn"]["c_attn"]
    assert node["lora"].ranks == (4, 2) and node["lora_A"].shape == (2, 32, 4)
    assert float(np.abs(node["lora_A"][1, :, 2:]).max()) == 0.0


def test_save_rejects_what_peft_cannot_represent(tmp_path):
    x = jnp.ones((1, 4, 4, 2))
    model = nn.Conv(3, (2, 2))
    config = lora_jax.LoraConfig(r=2, target_modules=".*")
    params = lora_jax.inject(model.init(jax.random.key(0), x)["params"], config,
                             jax.random.key(1), layouts=lora_jax.layouts(model, x))
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 3\) per layer has no PyTorch "
                                         r"Linear/Embedding layout"):
        save_peft(tmp_path, params, config)
    dense = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    with pytest.raises(ValueError, match="hold no LoRA factors"):
        save_peft(tmp_path, {"d": dense}, config)
    seq_cls = lora_jax.LoraConfig(r=2, target_modules=["d"], task_type="SEQ_CLS")
    adapted = lora_jax.inject({"d": dense}, seq_cls, jax.random.key(1))
    with pytest.raises(ValueError, match=r"task_type='CAUSAL_LM' but the config's is 'SEQ_CLS'"):
        save_peft(tmp_path, adapted, seq_cls, task_type="CAUSAL_LM")



def _file_hashes(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


FACTOR = PREFIX + "h.0.attn.c_attn.lora_A.weight"
FILE_CASES = {  # (edit, the file the message names, message)
    "NaN factor": (dict(tensors=lambda w: w[FACTOR].fill_(float("nan"))),
                   "adapter_model.safetensors",
                   f"tensor {FACTOR} holds NaN or infinite values"),
    "int8 factor": (dict(tensors=lambda w: w.__setitem__(FACTOR, w[FACTOR].to(torch.int8))),
                    "adapter_model.safetensors", f"tensor {FACTOR} is int8, not a float"),
    "bool factor": (dict(tensors=lambda w: w.__setitem__(FACTOR, w[FACTOR] > 0)),
                    "adapter_model.safetensors", f"tensor {FACTOR} is bool, not a float"),
    "truncated weights": (dict(raw=lambda b: b[: len(b) // 2]), "adapter_model.safetensors",
                          "(truncated or corrupt?): Error while deserializing header"),
    "invalid JSON": (dict(config_text='{"r": 4,'), "adapter_config.json",
                     "is not valid JSON (Expecting property name"),
    "a JSON list": (dict(config_text="[1, 2]"), "adapter_config.json",
                    "is not a JSON object but a list"),
    "not UTF-8": (dict(config_text=b'{"r": "caf\xe9"}'), "adapter_config.json",
                  "is not UTF-8 text (byte 10)"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_damaged_files_are_refused_naming_the_file(adapter, tmp_path, case):
    """Before: NaN / int8 / bool factors loaded (int8 and bool cast to float32), and file errors
    were raw (`SafetensorError: invalid header length`, `JSONDecodeError`, `'list' object has no
    attribute 'get'`, `UnicodeDecodeError`) without the file's name."""
    src, base = adapter
    edit, name, message = FILE_CASES[case]
    folder = edited(src, tmp_path / "bad", tensors=edit.get("tensors"))
    if "raw" in edit:
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(edit["raw"](weights.read_bytes()))
    if "config_text" in edit:
        text = edit["config_text"]
        (folder / "adapter_config.json").write_bytes(text if isinstance(text, bytes)
                                                     else text.encode())
    before = _file_hashes(folder)
    with pytest.raises(ValueError) as err:
        load_peft(folder, base)
    assert str(err.value).startswith(str(folder / name)) or \
        f"cannot read {folder / name}" in str(err.value), str(err.value)
    assert message in str(err.value), str(err.value)
    assert _file_hashes(folder) == before
