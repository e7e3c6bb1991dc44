"""The two test tiers, switched by one environment variable.

`python -m pytest -q` runs the CI tier. `LORA_JAX_FULL=1 python -m pytest -q` runs the full
tier: every test, including those marked `@pytest.mark.full` (tests/conftest.py leaves them out
of the CI tier), with the larger budgets below (hypothesis examples, peft differential configs).
"""

import os

FULL = os.environ.get("LORA_JAX_FULL", "") == "1"


def examples(ci: int, full: int = 200) -> int:
    """How many examples a property test draws: `ci` in the CI tier, `full` in the full tier."""
    return full if FULL else ci


# The CI tier's models are tiny, so its time is mostly XLA compiling them: LLVM's lowest
# optimisation level halves it (measured: 4 heavy test files, 110 s -> 57 s CPU). The full tier
# compiles as users do, with XLA's defaults.
FAST_COMPILE = "" if FULL else \
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices, in this tier."""
    return f"--xla_force_host_platform_device_count={devices}{FAST_COMPILE}"
