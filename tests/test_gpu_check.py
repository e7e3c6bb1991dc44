"""experiments/gpu_check.sh, the one-shot accelerator check, runs end to end at toy sizes on CPU
and writes its one table (each of its three steps' sections, with measured rows)."""

import os
import subprocess
from pathlib import Path

import pytest
from budget import xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.full  # three real runs (GPT-2 benchmark, SmolLM2 QLoRA, a finetune): minutes on CPU
def test_gpu_check_runs_at_toy_sizes(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    proc = subprocess.run([str(ROOT / "experiments" / "gpu_check.sh"), "--toy", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "2 x cpu (cpu)" in table and "toy sizes: yes" in table
    assert "| JAX | LoRA |" in table and "| JAX | frozen-base bound |" in table
    assert "QLoRA NF4" in table and "QLoRA GGUF Q4_1" in table
    assert "--mesh data=2" in table and (tmp_path / "finetune" / "adapter").is_dir()
