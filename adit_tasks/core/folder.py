"""Folder helpers: path components that stay unique, and durable atomic writes inside a root.

Each file is written under a temporary name in its final folder, flushed to disk (file, then
folder) and renamed when complete, so a crash never leaves a half-written file under a name
that looks finished, and a power loss never leaves a finished name with missing bytes. A write
that fails removes its temporary file. The writer refuses any final path outside its root
(defence in depth: names are built from checked values only).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from adit_tasks.core.errors import DestinationUnwritable

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# Write errors that will repeat whatever we do: not worth asking the PACS again.
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                     errno.ENAMETOOLONG, errno.EFBIG}


def safe_component(text: str, fallback: str = "unknown", max_len: int = 64) -> str:
    """A path component with only letters, digits, dot, dash and underscore."""
    cleaned = _UNSAFE.sub("_", text.strip()).strip("._")[:max_len]
    return cleaned or fallback


def unique_component(text: str, fallback: str = "unknown", max_len: int = 64) -> str:
    """Like safe_component, but two different values never share a name: when the value had
    to be changed to be safe (`12/34` vs `12_34`, or only non-ASCII letters), a short digest
    of the original is added (`12_34-5f2c1a9e`)."""
    safe = safe_component(text, fallback, max_len - 9)
    if safe == text:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe}-{digest}"


def write_atomically(root: Path, relative: Path, data: bytes, *,
                     sync_folder: bool = True) -> Path:
    """Write `data` to `root/relative` durably via a temporary file and a rename; the path.

    DestinationUnwritable (permanent) for a full disk, missing permission or a read-only
    folder; ValueError for a path that would leave `root`. Writers of many files pass
    `sync_folder=False` and call `sync_folders` once for the folders they wrote to.
    """
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError("refusing to write outside the destination folder")
    tmp = path.with_name(f".{path.name}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_folder:
            sync_folders([path.parent])
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
            raise DestinationUnwritable(
                f"the destination folder cannot be written: {os.strerror(exc.errno)}") from None
        raise
    return path


def sync_folders(folders: Iterable[Path]) -> None:
    """Make renames in these folders durable (fsync of each folder)."""
    for folder in set(folders):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
