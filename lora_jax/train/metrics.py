"""Per-step metrics of a run: one JSON line per step in `metrics.jsonl`, and optionally the same
numbers as TensorBoard scalars (written by tensorboardX, `pip install 'lora-jax[tensorboard]'`).
Only process 0 writes; the others' log is a no-op.

>>> import json, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
>>> with MetricsLog(path) as log:
...     log({"step": 1, "loss": 2.5, "lr": 1e-3})
>>> json.loads(path.read_text())["loss"]
2.5
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INSTALL_TENSORBOARD = "pip install 'lora-jax[tensorboard]' (or pip install tensorboardX)"


def check_tensorboard() -> None:
    """Raise a one-line ValueError naming the install command when tensorboardX is missing."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ValueError(f"--tensorboard needs the tensorboardX package: {INSTALL_TENSORBOARD}"
                         ) from None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """`log(row)` appends `row` (a dict with an int `step`) as a JSON line to `path` and, with
    `tensorboard` (a folder), writes each number in it as the scalar `<key>` at that step.
    `start_step`: the step a resumed run continues from (lines after it are dropped; TensorBoard
    purges its events after it)."""

    def __init__(self, path: str | Path, tensorboard: str | Path | None = None,
                 start_step: int = 0) -> None:
        import jax

        self.path, self.writer, self.file = Path(path), None, None
        if jax.process_index() != 0:
            return
        kept = [row for row in read_rows(self.path) if row["step"] <= start_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        self.file = self.path.open("a")
        if tensorboard is not None:
            check_tensorboard()
            from tensorboardX import SummaryWriter

            # Events after start_step: a resumed run's later steps, or a rerun's old ones.
            self.writer = SummaryWriter(str(tensorboard), purge_step=start_step + 1)

    def __call__(self, row: Mapping[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(dict(row), allow_nan=False) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
