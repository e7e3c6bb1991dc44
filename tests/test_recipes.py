"""The seed's three use cases as `lora-jax` recipes (docs/guides/cli.md), each run as the real
command in a subprocess on a tiny random HF model of its architecture: fine-tune, generate with
the adapter, merge. The oracle is transformers: its PyTorch class reads the merged folder and its
greedy `generate` must produce what `lora-jax generate` produced with the un-merged adapter."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_run import error_line, lora_jax_cli, strict_json, transformers_continuation

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "examples" / "recipes"
# The commands the CLI guide shows (run from the repository root). The tests swap in a tiny model
# folder and a few steps; everything else is the recipe as documented.
GPT2_ADS = ("lora-jax finetune --model gpt2 --data examples/recipes/ads.txt --targets c_attn "
            "--r 8 --alpha 16 --dropout 0.05 --steps 300")
BLOOM_LEGAL = ("lora-jax finetune --model bloom-560m --data examples/recipes/legal.txt "
               "--targets query_key_value --r 8 --alpha 16 --steps 300")
T5_TAGS = ("lora-jax finetune --model t5-small --task seq2seq --data examples/recipes/pages.jsonl "
           r"--target-regex 'encoder\..*SelfAttention\.(q|k|v|o)' --r 8 --alpha 16 --steps 300")
QUICK = ["--steps", "12", "--batch-size", "4", "--seq-len", "24", "--lr", "3e-2",
         "--no-progress"]


def recipe_argv(recipe, model, out):
    """The guide's command as argv, on `model`, writing to `out`, in a few quick steps."""
    import shlex

    argv = shlex.split(recipe)[1:]
    argv[argv.index("--model") + 1] = str(model)
    argv = [str(RECIPES / Path(a).name) if a.startswith("examples/") else a for a in argv]
    del argv[argv.index("--steps"): argv.index("--steps") + 2]
    return [*argv, "--out", str(out), *QUICK]


def test_the_docs_show_the_recipes():
    # The README links the CLI guide for them (the README is the landing page).
    guide = (ROOT / "docs" / "guides" / "cli.md").read_text()
    assert "docs/guides/cli.md" in (ROOT / "README.md").read_text()
    for recipe in (GPT2_ADS, BLOOM_LEGAL, T5_TAGS):
        assert recipe in guide, recipe


def _finetune_generate_merge(model, recipe, tmp_path, prompt, seq2seq=False):
    out = tmp_path / "run"
    code, stdout, err = lora_jax_cli(*recipe_argv(recipe, model, out))
    assert code == 0, err
    metrics = strict_json(out / "metrics.json")
    assert metrics["test"]["perplexity"] < metrics["test_before"]["perplexity"]
    code, generated, err = lora_jax_cli("generate", "--model", model, "--adapter",
                                        out / "adapter", "--prompt", prompt,
                                        "--max-new-tokens", "6")
    assert code == 0, err
    code, _, err = lora_jax_cli("merge", "--adapter", out / "adapter", "--out",
                                tmp_path / "merged")
    assert code == 0, err
    want = transformers_continuation(tmp_path / "merged", prompt, 6, seq2seq)
    assert generated.rstrip("\n") == want
    return out, generated


def test_recipe_gpt2_ad_text_with_lora_on_c_attn(tiny_gpt2, tmp_path):
    out, generated = _finetune_generate_merge(tiny_gpt2, GPT2_ADS, tmp_path, "Shop now")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 8
    assert generated.startswith("Shop now") and len(generated.strip()) > len("Shop now")


@pytest.mark.full
def test_recipe_bloom_legal_text_the_seeds_q_proj_v_proj_names_query_key_value(tiny_bloom,
                                                                               tmp_path):
    seed_names = BLOOM_LEGAL.replace("query_key_value", "q_proj,v_proj")
    code, _, err = lora_jax_cli(*recipe_argv(seed_names, tiny_bloom, tmp_path / "seed"))
    assert code == 2
    line = error_line(err)
    assert ("q_proj, v_proj are query / value projections: this model fuses q, k and v in one "
            "module; use target_modules=['query_key_value']") in line
    assert not (tmp_path / "seed").exists() or not any((tmp_path / "seed").iterdir())

    out, _ = _finetune_generate_merge(tiny_bloom, BLOOM_LEGAL, tmp_path, "The Supplier shall")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query_key_value"]


@pytest.mark.full
def test_recipe_t5_meta_tags_with_lora_on_the_encoder_attention_only(tiny_t5, tmp_path):
    from safetensors.numpy import load_file

    out, generated = _finetune_generate_merge(tiny_t5, T5_TAGS, tmp_path,
                                              "New desk lamp collection", seq2seq=True)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    names = load_file(out / "adapter" / "adapter_model.safetensors")
    modules = {re.sub(r"\.lora_[AB]\.weight$", "", n) for n in names}
    # 2 encoder blocks x q, k, v, o of the self-attention; nothing in the decoder.
    assert len(modules) == 8 and len(names) == 16
    assert all(".encoder.block." in m and ".SelfAttention." in m for m in modules), modules
    assert generated.strip()


def _main(capsys, *argv):
    """`lora-jax ARGV` in this process (these errors come before any model is loaded)."""
    from lora_jax.cli import main as cli

    capsys.readouterr()  # not the fixtures' output
    code = cli.main([str(a) for a in argv])
    return code, error_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad, message", [
    ('{"text": "a page"}', ':1: expected an object with string "input" and "target" fields'),
    ('{"input": "a page", "target": 3}', ':1: expected an object with string "input"'),
])
def test_seq2seq_data_errors_name_the_line(capsys, tiny_t5, tmp_path, bad, message):
    data = tmp_path / "pages.jsonl"
    data.write_text(bad + "\n")
    code, err = _main(capsys, "finetune", "--model", tiny_t5, "--data", data, "--out",
                      tmp_path / "run")
    assert code == 2 and f"{data}{message}" in err


@pytest.mark.parametrize("model, argv, message", [
    ("tiny_t5", ["--task", "lm"], "--task lm does not apply to"),
    ("tiny_t5", ["--method", "prompt"], "--method prompt supports --task classify and lm"),
    ("tiny_gpt2", ["--task", "seq2seq"], "a gpt2 causal LM: use --task lm"),
    ("tiny_bloom", ["--task", "classify"], "is a bloom causal LM (use --task lm)"),
    ("tiny_t5", ["--data", "bbc"], "--task seq2seq reads a .jsonl file"),
])
def test_seq2seq_task_mismatches_are_one_line_errors(capsys, request, tmp_path, model, argv,
                                                     message):
    folder = request.getfixturevalue(model)
    data = ["--data", RECIPES / "pages.jsonl"] if "--data" not in argv else []
    code, err = _main(capsys, "finetune", "--model", folder, *data, *argv, "--out",
                      tmp_path / "run", "--steps", "1", "--no-progress")
    assert code == 2 and message in err, err


def test_seq2seq_loss_equals_transformers_t5_loss(tiny_t5):
    """The seq2seq batch (targets + EOS, decoder inputs shifted behind the start token) gives
    transformers' own T5 loss for `labels` (-100 on padding)."""
    import jax.numpy as jnp
    import torch
    import transformers

    from lora_jax.models import from_pretrained, load_tokenizer
    from lora_jax.train import data
    from lora_jax.train import loop as train

    tok = load_tokenizer(tiny_t5)
    rows = [json.loads(line) for line in (RECIPES / "pages.jsonl").read_text().splitlines()[:4]]
    arrays = data.seq2seq_arrays(tok, [r["input"] for r in rows], [r["target"] for r in rows],
                                 16, eos_id=tok.token_to_id("[SEP]"), decoder_start_id=0)
    module, params = from_pretrained(tiny_t5)
    logits = module.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"],
                          arrays["decoder_input_ids"])
    ours = float(train.task_loss("seq2seq", logits, {k: jnp.asarray(v) for k, v in
                                                     arrays.items()}))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    labels = np.where(arrays["label_mask"] == 1, arrays["labels"], -100)
    with torch.no_grad():
        want = hf(input_ids=torch.as_tensor(arrays["input_ids"]).long(),
                  attention_mask=torch.as_tensor(arrays["attention_mask"]),
                  labels=torch.as_tensor(labels).long()).loss.item()
    np.testing.assert_allclose(ours, want, rtol=1e-5)
    assert (arrays["labels"][arrays["label_mask"] == 1] == tok.token_to_id("[SEP]")).sum() == 4
