"""The package as a user installs it: `python -m build` makes an sdist and a wheel (built from the
sdist), each installs into a fresh virtual environment, and there `lora-jax --version` prints
`lora_jax.__version__` and the README's example runs.

The environments are made with `--system-site-packages` so that jax, flax, optax and the other
dependencies (gigabytes) come from this python instead of being downloaded again; lora_jax itself
comes only from the built file: pip installs it with `--no-index` (so every declared dependency
must already be satisfied, or the install fails), outside the repository and without PYTHONPATH,
and the test checks that `import lora_jax` finds the copy inside the environment. The build runs
`--no-isolation` (the installed setuptools, no network)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lora_jax

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env):
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _readme_example() -> str:
    """The README's first python block: the example every reader copies."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    pytest.importorskip("build", reason="the docs extra installs `build`: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], ROOT,
         os.environ)
    return out


@pytest.mark.parametrize("kind", ["whl", pytest.param("tar.gz", marks=pytest.mark.full)])
def test_built_package_installs_and_runs(dist, tmp_path, kind):
    (built,) = dist.glob(f"lora_jax-{lora_jax.__version__}*.{kind}")
    venv = tmp_path / "venv"
    # --without-pip: this python's pip and setuptools (pip --python) install into the venv; the
    # setuptools a venv bundles can be older than the one pyproject.toml asks for.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path,
         os.environ)
    python, script = venv / "bin" / "python", venv / "bin" / "lora-jax"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    # --no-index: each declared dependency must already be installed here, or this fails.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-index",
          "--no-build-isolation", built], tmp_path, env)

    where = _run([python, "-c", "import lora_jax; print(lora_jax.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(venv), where
    assert (Path(where.strip()).parent / "py.typed").exists()
    assert _run([script, "--version"], tmp_path, env).strip() == f"lora-jax {lora_jax.__version__}"

    example = tmp_path / "example.py"
    example.write_text(_readme_example() + "\nprint('example ran')\n")
    assert _run([python, example], tmp_path, env).strip().endswith("example ran")
