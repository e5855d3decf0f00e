"""Folder helpers: safe path components and atomic writes.

Each file is written under a temporary name in its final folder and renamed when complete,
so a crash never leaves a half-written file under a name that looks finished.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_component(text: str, fallback: str = "unknown", max_len: int = 64) -> str:
    """A path component with only letters, digits, dot, dash and underscore."""
    cleaned = _UNSAFE.sub("_", text.strip()).strip("._")[:max_len]
    return cleaned or fallback


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
