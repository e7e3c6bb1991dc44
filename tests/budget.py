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
