"""`python -m lora_jax ...` runs the `lora-jax` command line."""

import sys

from lora_jax.cli.main import main

sys.exit(main())
