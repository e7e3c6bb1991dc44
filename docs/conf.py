"""Sphinx configuration of lora_jax's documentation.

Build (offline, warnings are errors, every guide executed on CPU):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lora_jax, for autodoc
sys.path.insert(0, str(Path(__file__).parent / "_ext"))
# The guides' kernels inherit this environment: this checkout's lora_jax, JAX on CPU with 8
# simulated devices (the sharding guide uses a mesh of them).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                         os.environ.get("PYTHONPATH")]))
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import lora_jax  # noqa: E402

project = "lora_jax"
author = "the lora_jax authors"
copyright = "the lora_jax authors"
version = release = lora_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx_design",
    "lora_jax_docs",
]
exclude_patterns = ["_build", "jupyter_execute", "README.md"]
default_role = "code"  # `name` in docstrings is code, as in the README
smartquotes = False  # quotes and backslashes in help texts and regexes stay as written

# Notebooks (MyST markdown with code cells) run at every build; a failing cell fails it.
nb_execution_mode = "force"
# A failing cell stops the build; LORA_JAX_DOCS_ALL_ERRORS=1 reports every failing page instead
# (each as a warning, which -W still turns into a failed build).
nb_execution_raise_on_error = not os.environ.get("LORA_JAX_DOCS_ALL_ERRORS")
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
autodoc_typehints_format = "short"
python_use_unqualified_type_names = True

html_theme = "sphinx_book_theme"
html_title = f"lora_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []
