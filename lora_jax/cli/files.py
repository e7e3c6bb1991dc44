"""Files of a run: read with errors that name the file, write whole or not at all.

`write_json` / `write_bytes` write a temporary file and rename it, `new_folder` fills a
temporary folder and renames it, so a process killed midway leaves the old content or none,
never a part.

    write_json(out / "metrics.json", {"loss": float("nan")})   # written as {"loss": null}
    with new_folder(out / "adapter") as tmp:
        save_adapter(tmp, ...)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """A JSON file's value; a missing, non-UTF-8 or malformed file is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any, indent: int | None = 1) -> None:
    """Write valid JSON (non-finite numbers as null) atomically: a temporary file, then rename."""
    write_bytes(path, json.dumps(json_safe(value), indent=indent, allow_nan=False).encode())


def write_bytes(path: Path, data: bytes) -> None:
    """`path` holds `data` afterwards, or (killed midway) its old content: never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def new_folder(final: Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success it is renamed to `final` (replacing an
    older `final` of ours only after the new one is complete), on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(folder: Path, flag: str = "--out") -> None:
    """Create `folder` if needed and make sure files can be written in it (before any model
    is loaded, so a read-only or full destination fails at once)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot write there ({err.strerror or err})") from None


def empty_or_absent(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def _checkpoint_steps(folder: Path) -> list[int]:
    """Complete checkpoint steps under `folder` (digit-named subfolders)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def unstarted_run(folder: Path) -> bool:
    """A run folder that holds no checkpoint yet (stopped before the first one, or killed
    while writing run_config.json: only our temporary files): reusable."""
    names = {p.name for p in folder.iterdir()}
    ours = {"run_config.json", "losses.json", "checkpoint"}
    leftovers = {n for n in names - ours if not (n.startswith(".") and n.endswith(".tmp"))}
    return not leftovers and not _checkpoint_steps(folder / "checkpoint")
