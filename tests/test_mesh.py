"""`lora-jax finetune --mesh` on 8 simulated CPU devices: data-parallel, fsdp and both give the
one-device run's losses and adapter; a run stopped on one mesh resumes on another with the
uninterrupted run's losses; bad meshes and process flags are one-line errors; two processes x 4
devices launched through the command line train as one process with 8 devices."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from budget import xla_flags
from cli_run import ENV, error_line
from test_multihost import free_port

from lora_jax.cli import main as cli

STEPS = 4
SAVE_EVERY = 2


def _text(folder):
    text = folder / "notes.txt"
    words = "the match ended with a late goal for the home team after a long wet night".split()
    rng = np.random.default_rng(0)
    text.write_text("\n\n".join(" ".join(rng.choice(words, 12)) for _ in range(40)))
    return text


def _argv(model, text, out, mesh):
    return ["finetune", "--model", str(model), "--data", str(text), "--out", str(out),
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--batch-size", "8",
            "--seq-len", "16", "--lr", "3e-2", "--no-progress", "--mesh", mesh]


@pytest.fixture(scope="module")
def runs(tiny_gpt2, tmp_path_factory):
    """One finished run per mesh, run on demand and shared by the tests of this module."""
    root = tmp_path_factory.mktemp("mesh")
    text = _text(root)
    done = {}

    def run(mesh):
        if mesh not in done:
            out = root / mesh.replace(",", "_").replace("=", "")
            assert cli.main(_argv(tiny_gpt2, text, out, mesh)) == 0
            done[mesh] = out
        return done[mesh]

    return run


def _losses(out):
    return json.loads((out / "metrics.json").read_text())["losses"]


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _same_run(out, reference):
    np.testing.assert_allclose(_losses(out), _losses(reference), rtol=1e-5)
    mine, theirs = _adapter(out), _adapter(reference)
    assert sorted(mine) == sorted(theirs)
    for key in theirs:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _check_mesh(runs, mesh):
    out = runs(mesh)
    assert json.loads((out / "metrics.json").read_text())["mesh"] == mesh
    assert len(_losses(out)) == STEPS
    _same_run(out, runs("data=1"))


def _check_resume(runs, tmp_path, mesh):
    """The fsdp=8 run, cut back to its step-2 checkpoint, resumed on `mesh`."""
    stopped = tmp_path / "stopped"
    shutil.copytree(runs("fsdp=8"), stopped)
    for name in ("adapter", "metrics.json", "loss.png", f"checkpoint/{STEPS}"):
        path = stopped / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()  # as if killed after step 2
    assert cli.main(["finetune", "--resume", str(stopped), "--mesh", mesh, "--no-progress"]) == 0
    _same_run(stopped, runs("data=1"))


def test_fsdp_gives_the_one_device_run_and_resumes_on_another_mesh(runs, tmp_path):
    """The CI case of both checks, in one test so that its runs are shared (xdist workers do not
    share fixtures)."""
    _check_mesh(runs, "fsdp=8")
    _check_resume(runs, tmp_path, "data=2,fsdp=4")


@pytest.mark.full
@pytest.mark.parametrize("mesh", ["data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2"])
def test_mesh_gives_the_one_device_run(runs, mesh):
    _check_mesh(runs, mesh)


@pytest.mark.full
def test_run_stopped_on_fsdp_resumes_on_one_device(runs, tmp_path):
    _check_resume(runs, tmp_path, "data=1")


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "model=2"], "argument --mesh: unknown mesh axis 'model' in 'model=2': use "
                            "data, fsdp, tensor"),
    (["--mesh", "data=0"], "argument --mesh: 'data=0' in 'data=0': a mesh axis size is a "
                           "positive integer"),
    (["--mesh", "data=2,data=4"], "argument --mesh: mesh axis 'data' is given twice"),
    (["--mesh", "data=3"], "--mesh data=3 uses 3 devices; there are 8: give sizes whose product "
                           "divides 8"),
    (["--mesh", "data=4,fsdp=4"], "--mesh data=4,fsdp=4 uses 16 devices"),
    (["--mesh", "data=2,fsdp=4", "--batch-size", "12"],
     "--batch-size 12 does not divide over the 8 batch devices of --mesh data=2,fsdp=4"),
    (["--process-id", "1"], "--coordinator, --num-processes missing"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 is not below --num-processes 2"),
    (["--sweep", "lr=1e-3,1e-2", "--mesh", "data=2"],
     "--sweep trains its adapters on one device: drop --mesh"),
])
def test_bad_mesh_or_hosts_is_one_line(capsys, tmp_path, flags, message):
    code = cli.main(["finetune", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in error_line(err), err


def _mesh_error(capsys, model, tmp_path, mesh):
    code = cli.main(_argv(model, _text(tmp_path), tmp_path / "run", mesh))
    err = capsys.readouterr().err
    assert code == 2
    return error_line(err)


def test_mesh_a_weight_does_not_divide_over_is_one_line(capsys, tiny_gpt2, tmp_path):
    # GPT-2's rules split the vocabulary over "tensor": 30522 rows do not divide by 4.
    assert ("--mesh data=2,tensor=4: 'transformer.wte.embedding' has shape (30522, 32): axis 0 "
            "of size 30522 does not divide over mesh axes ('tensor',) (4 devices)"
            ) in _mesh_error(capsys, tiny_gpt2, tmp_path, "data=2,tensor=4")


@pytest.mark.full
def test_tensor_without_the_architectures_rules_is_one_line(capsys, tiny_bloom, tmp_path):
    assert ("--mesh data=4,tensor=2: a bloom has no tensor-parallel rules; use data and fsdp"
            in _mesh_error(capsys, tiny_bloom, tmp_path, "data=4,tensor=2"))


@pytest.mark.full
def test_two_processes_through_the_cli(runs, tiny_gpt2, tmp_path):
    """Each host runs the same command with its --process-id; the run folder is shared."""
    port, text, out = free_port(), _text(tmp_path), tmp_path / "multi"
    env = dict(ENV, XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lora_jax", *_argv(tiny_gpt2, text, out, "data=2,fsdp=4"),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=400)[0])
        finally:
            proc.kill()
        assert proc.returncode == 0, outputs[-1][-3000:]
    assert "trainable params" in outputs[0] and "trainable params" not in outputs[1]
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    _same_run(out, runs("data=1"))
