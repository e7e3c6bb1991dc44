"""`lora-jax finetune --frontend nnx`: the main job on the NNX twin of the model gives the linen
run's losses and adapter (same seed, no dropout), and generate / merge read its adapter."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_cli import _notes, run_main

FRONTENDS = ("linen", "nnx")


def _finetune(model, text, out, *flags):
    return ["finetune", "--model", str(model), "--data", str(text), "--out", str(out),
            "--steps", "6", "--batch-size", "4", "--seq-len", "16", "--lr", "3e-2",
            "--no-progress", *flags]


def test_linen_and_nnx_frontends_give_the_same_losses_and_adapter(capsys, tiny_llama, tmp_path):
    text = _notes(tmp_path)
    # One process per frontend (run side by side), as a user runs them. Without dropout the two
    # compute the same factors, forward and gradients: measured equal bit for bit. (With
    # --dropout the masks differ: linen folds module paths into the step's key, NNX reseeds a
    # stream per module; 8 steps at --dropout 0.05 differed by <= 2.9e-3 in the loss.)
    procs = {frontend: subprocess.Popen(
        [sys.executable, "-m", "lora_jax", *_finetune(tiny_llama, text, tmp_path / frontend,
                                                      "--dropout", "0", "--seed", "3",
                                                      "--frontend", frontend)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for frontend in FRONTENDS}
    for frontend, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (frontend, err)
    linen, nnx = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in FRONTENDS)
    assert nnx["losses"][-1] < nnx["losses"][0]
    assert nnx["test"]["perplexity"] < nnx["test_before"]["perplexity"]
    np.testing.assert_allclose(nnx["losses"], linen["losses"], rtol=1e-6)
    ours, theirs = (load_file(tmp_path / f / "adapter" / "adapter_model.safetensors")
                    for f in ("nnx", "linen"))
    assert ours.keys() == theirs.keys() and any(k.endswith("lora_B.weight") for k in ours)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-7)
    assert json.loads((tmp_path / "nnx" / "run_config.json").read_text())["frontend"] == "nnx"

    # generate and merge read the NNX run's adapter (a peft adapter like the linen run's)
    adapter = str(tmp_path / "nnx" / "adapter")
    code, stdout, err = run_main(capsys, "generate", "--model", str(tiny_llama), "--adapter",
                                 adapter, "--prompt", "the match", "--max-new-tokens", "4")
    assert code == 0 and stdout.startswith("the match"), err
    code, _, err = run_main(capsys, "merge", "--adapter", adapter, "--out",
                            str(tmp_path / "merged"))
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file(), err


def test_dora_runs_on_nnx(capsys, tiny_llama, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *_finetune(tiny_llama, _notes(tmp_path), out, "--dora",
                                               "--frontend", "nnx"))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] < metrics["test_before"]["perplexity"]
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in keys)


@pytest.mark.parametrize("flags, message", [
    (("--method", "full"), "--frontend nnx runs --method lora, not full"),
    (("--quantize", "nf4"), "--frontend nnx with --quantize"),
    (("--frontend", "jax"), "argument --frontend: invalid choice: 'jax'"),
])
def test_nnx_frontend_bad_input(capsys, tiny_llama, tmp_path, flags, message):
    code, _, err = run_main(capsys, *_finetune(tiny_llama, _notes(tmp_path), tmp_path / "run",
                                               "--frontend", "nnx", *flags))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_nnx_frontend_refuses_an_encoder(capsys, tiny_bert, tmp_path):
    data = tmp_path / "topics.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]})
                              for i in range(20)))
    code, _, err = run_main(capsys, "finetune", "--model", str(tiny_bert), "--data", str(data),
                            "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress",
                            "--frontend", "nnx")
    assert code == 2 and "--frontend nnx runs causal LMs (gpt2, llama, --task lm); this is a " \
        "bert model with --task classify" in err, err
