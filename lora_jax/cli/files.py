"""Files of a run: read with errors that name the file, written whole or not at all (a
temporary file or folder, then a rename: a process killed midway leaves the old content).

    write_json(out / "metrics.json", {"loss": float("nan")})   # written as {"loss": null}
    with new_folder(out / "adapter") as tmp:
        save_adapter(tmp, ...)
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl  # locks tell a live process's temporary folder from a killed one's
except ImportError:  # Windows: stale temporary folders are left in place
    fcntl = None  # type: ignore[assignment]


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
    """`path` holds `data` afterwards, or (killed midway) its old content: never a part. The
    file's mode follows the umask, as a file written with `open` would."""
    path = Path(path)
    tmp, fd = _create(path.parent, path.name, ".tmp", lambda p: os.open(
        p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
    """A temporary sibling folder to fill, renamed to `final` on success (an older `final`
    replaced only then), removed on failure. Its files get the umask's modes (safetensors
    writes 0600); temporary folders of `final` that a killed process left are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp, lock = _locked_folder(final.parent, final.name, ".tmp")
    try:
        yield tmp
        _follow_umask(tmp)
        if final.exists():
            old, old_lock = _locked_folder(final.parent, final.name, ".old")
            try:
                os.replace(final, old / final.name)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                os.close(old_lock)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _create(parent: Path, name: str, suffix: str, make: Callable[[Path], Any]) -> tuple[Path, Any]:
    """(`parent/.name.<random><suffix>`, what `make` returned creating it), a name no one has."""
    while True:
        path = parent / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            return path, make(path)
        except FileExistsError:
            continue


def _locked_folder(parent: Path, name: str, suffix: str) -> tuple[Path, int]:
    """A new folder `parent/.name.<random><suffix>` and a descriptor locking it until closed
    (or the process dies); made as `.new`, then renamed, so `_remove_stale` never sees it
    unlocked."""
    new, _ = _create(parent, name, ".new", lambda p: os.mkdir(p, 0o777))
    fd = os.open(new, os.O_RDONLY)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    locked = new.with_name(new.name[: -len(".new")] + suffix)
    os.replace(new, locked)
    return locked, fd


def _remove_stale(final: Path) -> None:
    """Remove the temporary folders of `final` that a killed process left (their lock is
    free); `.old` ones (the previous `final`) only when `final` exists."""
    if fcntl is None:
        return
    suffixes = (".tmp", ".old") if final.exists() else (".tmp",)
    for path in final.parent.glob(f".{glob.escape(final.name)}.*"):
        if path.suffix not in suffixes or not path.is_dir() or path.is_symlink():
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live process is writing it
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _follow_umask(folder: Path) -> None:
    """Everything under `folder` to the umask's modes (read from `folder`, made 0o777)."""
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(folder_mode if path.is_dir() else folder_mode & 0o666)


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


def unstarted_run(folder: Path) -> bool:
    """A run folder that holds no checkpoint yet (stopped before the first one, or killed
    while writing run_config.json: only our temporary files): reusable."""
    names = {p.name for p in folder.iterdir()}
    ours = {"run_config.json", "losses.json", "checkpoint", "metrics.jsonl", "tensorboard"}
    leftovers = {n for n in names - ours if not (n.startswith(".") and n.endswith(".tmp"))}
    checkpoints = folder / "checkpoint"  # a complete step is a digit-named folder
    return not leftovers and not (checkpoints.is_dir() and any(
        p.is_dir() and p.name.isdigit() for p in checkpoints.iterdir()))
