"""Multi-host: experiments/train_sharded.py as 2 processes x 4 CPU devices (jax.distributed on
localhost, gloo collectives) gives the losses of one process with 8 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from budget import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "experiments" / "train_sharded.py")
ARGS = ["--model", "gpt2", "--mesh", "2,2,2", "--steps", "3", "--batch", "8", "--hidden", "32",
        "--vocab", "128", "--seq", "8", "--lr", "3e-2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(devices, extra, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(devices))
    return subprocess.Popen([sys.executable, SCRIPT, *ARGS, *extra, "--losses-out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    return output


def test_two_processes_equal_one_process(tmp_path):
    port = free_port()
    workers = [launch(4, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                          "--process-id", str(i)], tmp_path / f"multi{i}.json") for i in (0, 1)]
    single = launch(8, [], tmp_path / "single.json")
    for proc in (*workers, single):
        finish(proc)
    multi = json.loads((tmp_path / "multi0.json").read_text())
    one = json.loads((tmp_path / "single.json").read_text())
    assert not (tmp_path / "multi1.json").exists()  # only process 0 reports
    assert (multi["processes"], multi["devices"]) == (2, 8)
    assert (one["processes"], one["devices"]) == (1, 8)
    assert len(multi["losses"]) == 3
    # float32; the cross-process all-reduces may sum in another order than in-process ones.
    np.testing.assert_allclose(multi["losses"], one["losses"], rtol=1e-5)
