"""Running the real `lora-jax` command in a subprocess, and what the CLI tests check of it."""

import hashlib
import json
import os
import subprocess
import sys

ENV = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}  # as tests/conftest.py sets


def lora_jax_cli(*args, timeout=300):
    """(exit status, stdout, stderr) of `python -m lora_jax ARGS`."""
    proc = subprocess.run([sys.executable, "-m", "lora_jax", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    return proc.returncode, proc.stdout, proc.stderr


def error_line(err):
    """The one `lora-jax` error line (library log lines, if any, are not ours)."""
    lines = [line for line in err.splitlines() if line.startswith("lora-jax")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(path):
    def bad(constant):
        raise AssertionError(f"{path} holds bare {constant}")
    return json.loads(path.read_text(), parse_constant=bad)
