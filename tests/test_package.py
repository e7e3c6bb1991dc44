"""The package's shape: the core never imports the models, the CLI or the data code."""

import subprocess
import sys


def test_import_lora_jax_imports_no_models_cli_or_data():
    code = ("import sys, lora_jax; print(sorted(m for m in sys.modules if m.startswith("
            "('lora_jax.models', 'lora_jax.cli', 'lora_jax.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_peft_io_names_an_unregistered_architecture_clearly():
    code = ("import lora_jax\n"
            "try:\n"
            "    lora_jax.peft.files._architecture('gpt2')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "unknown model_type 'gpt2': import lora_jax.models" in out.stdout
