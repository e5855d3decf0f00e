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
import secrets
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
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
    `sync_folder=False` and call `sync_folders` once for the folders they wrote to: then this
    returns once the bytes are written, and the file's flush and rename finish in the
    background; `sync_folders` waits for them (and raises their errors).
    """
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError("refusing to write outside the destination folder")
    # Unique: the same file may be written again while its first flush is still pending.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        if not sync_folder:
            _flushing.submit(path.parent, tmp, path)
            return path
        _flush_and_rename(tmp, path)
        sync_folders([path.parent])
    except BaseException as exc:
        _removed(tmp)
        unwritable = _classified(exc)
        if unwritable is not exc:
            raise unwritable from None
        raise
    return path


def _flush_and_rename(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _removed(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _classified(exc: BaseException) -> BaseException:
    """A write error that will repeat (full disk, no permission) as DestinationUnwritable."""
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return DestinationUnwritable(
            f"the destination folder cannot be written: {os.strerror(exc.errno)}")
    return exc


class _Flushing:
    """Flushes (fsync) and renames of files written with `sync_folder=False`, in a few
    threads while the writer goes on with the next file: fsync waits for the disk without
    holding the interpreter lock, and the file system groups concurrent flushes into fewer
    journal commits. Measured here (150 files of 0.53 MB, ext4): one fsync after each file
    0.6-1.5 s, no fsync 0.3-0.5 s, flushes in 8 threads 0.5-0.7 s. The pending flushes are
    kept per folder, so `sync_folders` waits for exactly those it makes durable."""

    def __init__(self, threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="adit-flush")
        self._pending: dict[Path, list[Future[None]]] = {}
        self._lock = threading.Lock()

    def submit(self, folder: Path, tmp: Path, path: Path) -> None:
        def flush() -> None:
            try:
                _flush_and_rename(tmp, path)
            except BaseException:
                _removed(tmp)
                raise

        future = self._pool.submit(flush)
        with self._lock:
            self._pending.setdefault(folder, []).append(future)

    def wait(self, folder: Path) -> None:
        """Wait for the folder's pending flushes; the first error (classified) is raised."""
        with self._lock:
            futures = self._pending.pop(folder, [])
        errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
        if errors:
            raise _classified(errors[0])


# A documented cache: the process's flushing threads and their pending files, per folder.
_flushing = _Flushing()


def sync_folders(folders: Iterable[Path]) -> None:
    """Make the files written into these folders and their renames durable: wait for their
    pending flushes (write_atomically with `sync_folder=False`), then fsync each folder."""
    folders = set(folders)
    errors = []
    for folder in folders:
        try:
            _flushing.wait(folder)
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
