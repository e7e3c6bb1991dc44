"""`lora-jax` command line: error handling, an end-to-end finetune, Ctrl-C and --resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lora_jax.cli import main as cli


def run_main(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--bogus"], "unrecognized arguments: --bogus"),
    (["finetune", "--method", "qlora"], "invalid choice: 'qlora'"),
    (["finetune", "--r", "0"], "must be positive"),
    (["finetune", "--save-every", "-3"], "--save-every: must be non-negative, got -3"),
    (["finetune", "--steps", "3", "--epochs", "1"], "not allowed with argument"),
    (["finetune", "--data", "/no/such/file.jsonl"], "no such file"),
    (["finetune", "--model", "bert-huge"], "unknown model 'bert-huge'"),
    (["finetune", "--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5"),
    (["finetune", "--dropout", "nan"], "argument --dropout: must be a finite number, got nan"),
    (["finetune", "--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (["finetune", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["finetune", "--lr=-1e-3"], "argument --lr: must be > 0, got -1e-3"),
    (["finetune", "--alpha", "nan"], "argument --alpha: must be a finite number, got nan"),
    (["finetune", "--alpha", "0"], "argument --alpha: must be > 0, got 0"),
    (["finetune", "--epochs", "inf"], "argument --epochs: must be a finite number, got inf"),
    (["finetune", "--seed", "-1"], "argument --seed: must be in [0, 2147483647], got -1"),
    (["finetune", "--seq-len", "0"], "argument --seq-len: must be positive, got 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"],
     "argument --temperature: must be a finite number, got nan"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
    (["generate", "--prompt", "x", "--top-p", "0"], "argument --top-p: must be in (0, 1]"),
    (["finetune", "--resume", "/no/such/run"], "not a lora-jax run folder"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_one_class_dataset_is_rejected(capsys, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": "a"}) for i in range(5)))
    code, _, err = run_main(capsys, "finetune", "--data", str(path))
    assert code == 2 and "only one class ('a')" in err and len(err.strip().splitlines()) == 1


def test_model_folder_without_config_is_rejected(capsys, tmp_path):
    code, _, err = run_main(capsys, "finetune", "--model", str(tmp_path))
    assert code == 2 and "neither an HF model folder" in err


def test_console_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "lora_jax", "finetune", "--model", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("lora-jax: error: unknown model 'nope': use minilm, smollm2, "
                                   "an HF model folder or a .gguf file")


# --- the training loop on a tiny stand-in (no model files needed) --------------------------------

def _tiny_setup():
    import flax.linen as nn
    import jax
    import numpy as np
    import optax

    import lora_jax

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, ids, mask):
            x = nn.Embed(32, 16, name="embed")(ids)
            x = nn.Dense(16, name="query")(x) * mask[..., None]
            return nn.Dense(3, name="classifier")(x.mean(1))

    model = Tiny()
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(0, 32, (40, 6)).astype(np.int32),
              "attention_mask": np.ones((40, 6), np.int32)}
    arrays["labels"] = (arrays["input_ids"][:, 0] % 3).astype(np.int32)
    config = lora_jax.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["query"],
                                 modules_to_save=["classifier"])
    params = lora_jax.inject(model.init(jax.random.key(0), arrays["input_ids"][:1],
                                        arrays["attention_mask"][:1])["params"],
                             config, jax.random.key(1))
    apply = lora_jax.wrap(model.apply, config)

    def forward(p, batch, key):
        return apply({"params": p}, batch["input_ids"], batch["attention_mask"],
                     rngs=None if key is None else {"dropout": key})

    tx = lora_jax.optimizer(optax.adam(3e-2), params, config)
    return forward, tx, params, config, arrays


def test_fit_resumed_from_a_checkpoint_repeats_the_uninterrupted_losses(tmp_path):
    import jax
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.core.checkpoint import AdapterCheckpointer
    from lora_jax.train import loop as train

    forward, tx, params, config, arrays = _tiny_setup()
    trainable, frozen = lora_jax.split(params, config)
    kw = dict(steps=12, seed=3, config=config, progress=False)
    fresh = lambda: jax.tree.map(jnp.copy, trainable)  # fit donates what it is given
    whole = train.fit(forward, "classify", tx, fresh(), frozen, train.batches(arrays, 8, 3),
                      **kw)
    assert whole.losses[-1] < 0.85 * whole.losses[0]  # it learns (dropout on, 12 steps)

    with AdapterCheckpointer(tmp_path / "ckpt") as ckpt:
        train.fit(forward, "classify", tx, fresh(), frozen, train.batches(arrays, 8, 3),
                  **{**kw, "steps": 5}, checkpointer=ckpt)
        target = (trainable, tx.init(trainable))
        step, restored, opt_state, _ = ckpt.restore(target=target)
    assert step == 5
    resumed = train.fit(forward, "classify", tx, restored, frozen,
                        train.batches(arrays, 8, 3, start_step=5), **kw, opt_state=opt_state,
                        start_step=5, losses=whole.losses[:5])
    assert resumed.losses == whole.losses  # exact on CPU: same batches, keys and programs
    evaluation = train.evaluate(forward, "classify", lora_jax.combine(resumed.trainable, frozen),
                                arrays, batch_size=16)  # 40 = 16 + 16 + 8 (padded)
    assert evaluation["examples"] == 40 and 0.0 <= evaluation["accuracy"] <= 1.0


# --- end to end on a tiny random BERT folder (MiniLM's tokenizer) ---------------------------------

@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    """Two easy classes: sport words vs money words."""
    rng = np.random.default_rng(0)
    words = {"sport": "match goal team player score coach league cup".split(),
             "money": "bank profit shares market price growth economy tax".split()}
    rows = [{"text": " ".join(rng.choice(words[label], 6)), "label": label}
            for _ in range(40) for label in words]
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _finetune_args(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out),
            "--seq-len", "12", "--batch-size", "8", "--lr", "5e-2", "--no-progress", *extra]


def test_finetune_end_to_end_writes_everything_and_learns(capsys, tiny_bert, topics, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_main(capsys, *_finetune_args(tiny_bert, topics, out, "--steps", "40"))
    assert code == 0
    assert "trainable params:" in stdout and "test accuracy" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])  # two separable topics
    assert metrics["test"]["accuracy"] >= 0.85
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert sorted(adapter_config["target_modules"]) == ["query", "value"]
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    from lora_jax.core.checkpoint import AdapterCheckpointer

    with AdapterCheckpointer(out / "checkpoint") as ckpt:
        assert ckpt.latest_step() == 40

    # merge: HF folder whose classifier + merged kernels give the adapted model's logits.
    merged = tmp_path / "merged"
    code, _, err = run_main(capsys, "merge", "--adapter", str(out / "adapter"), "--out",
                            str(merged))
    assert code == 0, err
    from lora_jax.models import from_pretrained

    module, params = from_pretrained(merged)
    assert type(module).__name__ == "BertForSequenceClassification"
    assert params["classifier"]["kernel"].shape == (32, 2)


def test_ctrl_c_saves_and_resume_reproduces_the_uninterrupted_losses(capsys, tiny_bert, topics,
                                                                     tmp_path):
    import signal
    import time

    steps = "800"
    interrupted = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "lora_jax",
            *_finetune_args(tiny_bert, topics, interrupted, "--steps", steps)]
    # The same XLA flags and matmul precision as this process (tests/conftest.py), so the
    # resumed and uninterrupted runs below can run here and still match bit for bit.
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stdout:  # the run announces itself just before training starts
        if line.startswith("lora on"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with: lora-jax finetune --resume" in err and "Traceback" not in err
    stopped_at = len(json.loads((interrupted / "losses.json").read_text()))
    assert 0 < stopped_at < int(steps)

    assert cli.main(["finetune", "--resume", str(interrupted)]) == 0
    assert f"resuming from step {stopped_at}" in capsys.readouterr().out
    whole = tmp_path / "whole"
    assert cli.main(_finetune_args(tiny_bert, topics, whole, "--steps", steps)) == 0
    losses = json.loads((interrupted / "metrics.json").read_text())["losses"]
    assert losses == json.loads((whole / "metrics.json").read_text())["losses"]  # bit-exact


def _notes(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(["the match ended with a late goal for the home team"] * 30))
    return text


@pytest.mark.parametrize("flags, rank, magnitudes", [
    (("--dora", "--loraplus-ratio", "16"), 8, True),
    (("--quantize", "nf4"), 8, False),
    (("--init", "pissa"), 16, False),  # converted to a plain LoRA of the original base: 2r
])
def test_lm_finetune_with_lora_variants(capsys, tiny_llama, tmp_path, flags, rank, magnitudes):
    from safetensors.numpy import load_file

    folder, text = tiny_llama, _notes(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "finetune", "--model", str(folder), "--data", str(text),
                                 "--out", str(out), "--steps", "8", "--batch-size", "4",
                                 "--seq-len", "16", "--lr", "3e-2", "--no-progress", *flags)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["test_before"]["perplexity"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == rank and adapter_config["use_dora"] is magnitudes
    assert adapter_config["init_lora_weights"] is True
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in keys) is magnitudes
    merged = tmp_path / "merged"
    code, _, err = run_main(capsys, "merge", "--adapter", str(out / "adapter"), "--out",
                            str(merged))
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    (["--init", "svd"], "argument --init: --init must be True, False, 'gaussian', 'pissa'"),
    (["--method", "head", "--dora"], "--dora, --init, --loraplus-ratio and --quantize apply "
                                     "to --method lora"),
    (["--dora", "--init", "olora"], "--dora with --init olora"),
    (["--loraplus-ratio", "0"], "argument --loraplus-ratio: must be > 0, got 0"),
    (["--quantize", "nf2"], "argument --quantize: invalid choice: 'nf2'"),
    (["--quantize", "nf4", "--init", "pissa"], "--quantize with --init pissa"),
    (["--method", "vera", "--decompose-both"], "--decompose-both applies to --method lokr"),
])
def test_lora_variant_flags_bad_input(capsys, tiny_llama, tmp_path, argv, message):
    folder, text = tiny_llama, _notes(tmp_path)
    code, _, err = run_main(capsys, "finetune", "--model", str(folder), "--data", str(text),
                            "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress",
                            *argv)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("method, flags", [
    ("vera", ("--r", "4", "--d-initial", "0.2", "--projection-prng-key", "3")),
    ("lokr", ("--r", "2", "--alpha", "4", "--decompose-both", "--decompose-factor", "4",
              "--rank-dropout", "0.1", "--module-dropout", "0.1")),
])
def test_vera_and_lokr_finetune_saves_a_folder_peft_loads(capsys, tiny_llama, tmp_path, method,
                                                          flags):
    """A few steps of `--method vera|lokr`; peft's VeRA / LoKr on the transformers model reads
    the saved folder and gives our logits (load_peft + wrap)."""
    import jax.numpy as jnp
    import peft
    import torch
    import transformers

    import lora_jax
    from lora_jax.models import from_pretrained

    folder, text = tiny_llama, _notes(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "finetune", "--model", str(folder), "--data", str(text),
                            "--out", str(out), "--steps", "3", "--batch-size", "4",
                            "--seq-len", "16", "--lr", "3e-2", "--no-progress",
                            "--method", method, *flags)
    assert code == 0, err
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == method.upper() and written["r"] == int(flags[1])
    assert written.get("rank_dropout", 0.1) == written.get("module_dropout", 0.1) == 0.1
    module, base = from_pretrained(folder)
    adapted, config = lora_jax.load_peft(out / "adapter", base, model_type="llama")
    assert type(config) is {"vera": lora_jax.VeraConfig, "lokr": lora_jax.LoKrConfig}[method]
    ids = np.arange(1, 9, dtype=np.int32)[None] * 7
    ours = np.asarray(lora_jax.wrap(module.apply, config)({"params": adapted}, jnp.asarray(ids)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()(
            input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - np.asarray(module.apply({"params": base}, ids))).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_lm_finetune_then_generate_with_the_adapter(capsys, tiny_llama, tmp_path):
    folder, text = tiny_llama, _notes(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "finetune", "--model", str(folder), "--data", str(text),
                                 "--out", str(out), "--steps", "20", "--batch-size", "4",
                                 "--seq-len", "16", "--lr", "3e-2", "--no-progress")
    assert code == 0, err
    assert "perplexity" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "lm" and metrics["test"]["perplexity"] < metrics["test_before"][
        "perplexity"]
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]

    code, stdout, err = run_main(capsys, "generate", "--model", str(folder), "--adapter",
                                 str(out / "adapter"), "--prompt", "the match",
                                 "--max-new-tokens", "4")
    assert code == 0, err
    assert stdout.startswith("the match") and len(stdout.split()) > 2

    # merge: an HF folder whose plain forward equals base + adapter through wrap (float32).
    merged = tmp_path / "merged"
    code, _, err = run_main(capsys, "merge", "--adapter", str(out / "adapter"), "--out",
                            str(merged))
    assert code == 0, err
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models import from_pretrained
    from lora_jax.peft.files import load_peft

    module, base = from_pretrained(folder)
    adapted, config = load_peft(out / "adapter", base, model_type="llama")
    merged_module, merged_params = from_pretrained(merged)
    ids = jnp.arange(1, 9, dtype=jnp.int32)[None] * 7
    want = lora_jax.wrap(module.apply, config)({"params": adapted}, ids)
    got = merged_module.apply({"params": merged_params}, ids)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert float(jnp.abs(module.apply({"params": base}, ids) - want).max()) > 1e-3  # it changed


def test_qlora_on_a_gguf_file_own_blocks(capsys, tiny_gguf, tmp_path):
    """`--quantize gguf`: finetune, generate and merge on a GGUF file's Q4_0 / Q4_1 / Q8_0
    projection weights as they are in the file; the merged folder's forward equals the blocks'
    dequantized base plus the adapter."""
    import jax.numpy as jnp

    import lora_jax
    from lora_jax.models import from_pretrained
    from lora_jax.models.gguf import load_gguf
    from lora_jax.peft.files import load_peft

    out, text = tmp_path / "run", _notes(tmp_path)
    code, _, err = run_main(capsys, "finetune", "--model", str(tiny_gguf), "--data", str(text),
                            "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len",
                            "16", "--lr", "3e-2", "--no-progress", "--quantize", "gguf")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["test_before"]["perplexity"]
    code, stdout, err = run_main(capsys, "generate", "--model", str(tiny_gguf), "--adapter",
                                 str(out / "adapter"), "--prompt", "the match",
                                 "--max-new-tokens", "4", "--quantize", "gguf")
    assert code == 0 and stdout.startswith("the match"), err
    merged = tmp_path / "merged"
    code, _, err = run_main(capsys, "merge", "--adapter", str(out / "adapter"), "--model",
                            str(tiny_gguf), "--out", str(merged), "--quantize", "gguf")
    assert code == 0, err
    module, blocks, _, _ = load_gguf(tiny_gguf, quantize="gguf")
    assert lora_jax.quant.quantize.has_quantized(blocks)
    adapted, config = load_peft(out / "adapter", blocks, model_type="llama")
    merged_module, merged_params = from_pretrained(merged)
    ids = jnp.arange(1, 9, dtype=jnp.int32)[None] * 7
    want = lora_jax.wrap(module.apply, config)({"params": adapted}, ids)
    np.testing.assert_allclose(merged_module.apply({"params": merged_params}, ids), want,
                               atol=1e-4)
    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path / "merged"), "--prompt",
                            "the match", "--quantize", "gguf")
    assert code == 2 and "--quantize gguf keeps a GGUF file's own blocks" in err, err


def test_generate_one_adapter_per_prompt_equals_each_alone(capsys, tiny_llama, tmp_path):
    import jax

    import lora_jax
    from lora_jax.models import from_pretrained

    _, base = from_pretrained(tiny_llama)
    folders = []
    for seed, targets in enumerate((["q_proj", "v_proj"], ["up_proj", "down_proj"])):
        config = lora_jax.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                     init_lora_weights=False)
        params = lora_jax.inject(base, config, jax.random.key(seed))
        params = jax.tree_util.tree_map_with_path(  # large enough to change greedy tokens
            lambda path, x: x * 30 if path[-1].key == "lora_B" else x, params)
        folders.append(str(tmp_path / f"adapter{seed}"))
        lora_jax.save_peft(folders[-1], params, config, model_type="llama")
    prompts = ["the match", "a goal", "new law"]
    adapters = [folders[0], "none", folders[1]]
    common = ["generate", "--model", str(tiny_llama), "--max-new-tokens", "5"]
    argv = [*common, *[a for p in prompts for a in ("--prompt", p)],
            *[a for f in adapters for a in ("--adapter", f)]]
    code, stdout, err = run_main(capsys, *argv)
    assert code == 0, err
    lines = stdout.splitlines()
    alone = []
    for prompt, folder in zip(prompts, adapters, strict=True):
        extra = [] if folder == "none" else ["--adapter", folder]
        code, out, err = run_main(capsys, *common, "--prompt", prompt, *extra)
        assert code == 0, err
        alone.append(out.strip())
    assert lines == alone
    assert len({line.split(" ", 2)[-1] for line in lines}) == 3  # three different continuations
    code, _, err = run_main(capsys, *common, "--prompt", "x", "--adapter", folders[0],
                            "--adapter", folders[1])
    assert code == 2 and "2 --adapter flags for 1 --prompt flags" in err, err
