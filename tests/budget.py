"""Hypothesis budgets: a small fixed number of examples per property test in CI, and any number
with `LORA_JAX_PROPERTY_EXAMPLES=N` (e.g. 200 for a longer search before a release)."""

import os

EXAMPLES = int(os.environ.get("LORA_JAX_PROPERTY_EXAMPLES", "0"))


def examples(ci: int) -> int:
    """`ci` examples, or LORA_JAX_PROPERTY_EXAMPLES when set."""
    return EXAMPLES or ci
