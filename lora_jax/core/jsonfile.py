"""Reading a JSON file, with errors that name it (the adapter config, a run's side files, an HF
model's config)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file's value; a missing, non-UTF-8, malformed or unreadable file is a ValueError
    naming it (and the byte or line where it breaks).

    >>> read_json("/no/such/file.json")
    Traceback (most recent call last):
    ValueError: /no/such/file.json does not exist
    """
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
