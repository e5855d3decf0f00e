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
from concurrent.futures import Future, ThreadPoolExecutor, wait
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


def write_atomically(root: Path, relative: Path, data: bytes) -> Path:
    """Write `data` to `root/relative` durably via a temporary file and a rename; the path.

    DestinationUnwritable (permanent) for a full disk, missing permission or a read-only
    folder; ValueError for a path that would leave `root`. For many files, FolderWriter.
    """
    writer = FolderWriter(root)
    writer.write(relative, data)
    writer.finish()
    return writer.root / relative


class FolderWriter:
    """Writes many files into one destination folder, durably, while the caller goes on.

    Each file is written, flushed (fsync), renamed and hashed (SHA-256) by one of a few
    background threads: they hold no interpreter lock while they wait for the disk or hash,
    and the thread receiving from the PACS is spared their system calls (each one a wait for
    the interpreter lock while the network threads are busy: 150 files took 0.27 s of path
    resolving alone). The root is resolved once and each folder checked and created once.
    At most `MAX_PENDING_BYTES` wait to be written: memory stays flat when the disk is slower
    than the network, also for a batch of studies at once. `finish()` waits for every file,
    makes the folders durable and returns each file's SHA-256; the first error is raised
    there (or by a later `write`).
    """

    MAX_PENDING_BYTES = 16 * 1024 * 1024

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._folders: set[Path] = set()
        self._pending: list[tuple[Path, Future[str]]] = []
        self._by_path: dict[Path, Future[str]] = {}
        self._room = threading.Condition()
        self._pending_bytes = 0
        self._failed = threading.Event()

    def write(self, relative: Path, data: bytes) -> None:
        """Hand `data` over to be written at `root/relative` (a relative path without `..`)."""
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError("refusing to write outside the destination folder")
        folder = self.root / relative.parent
        if folder not in self._folders:
            # A folder that is (or lies below) a symlink out of the destination is refused,
            # before anything is created there (checked once per folder and writer).
            self._check_inside(folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _classified(exc) from None
            self._check_inside(folder)
            self._folders.add(folder)
        if self._failed.is_set():
            self.finish()  # waits for the other files, raises the first error
        earlier = self._by_path.get(relative)
        if earlier is not None:
            wait([earlier])  # the same name twice: the later bytes win, and their digest
        with self._room:
            self._room.wait_for(lambda: self._pending_bytes < self.MAX_PENDING_BYTES)
            self._pending_bytes += len(data)
        future = _pool.submit(self._write, folder / relative.name, data)
        self._pending.append((relative, future))
        self._by_path[relative] = future

    def _check_inside(self, folder: Path) -> None:
        if not folder.resolve().is_relative_to(self.root):
            raise ValueError("refusing to write outside the destination folder")

    def finish(self) -> dict[Path, str]:
        """Wait for every file, make the folders durable; relative path -> SHA-256."""
        errors = [exc for exc in (f.exception() for _, f in self._pending) if exc is not None]
        if errors:
            raise _classified(errors[0])
        # The folders written to and every folder above them up to the root: a folder that
        # mkdir created is durable only once its parent is synced too.
        synced = {self.root}
        for folder in self._folders:
            synced.update(p for p in (folder, *folder.parents) if p.is_relative_to(self.root))
        for folder in sorted(synced, reverse=True):
            _sync_folder(folder)
        digests = {relative: future.result() for relative, future in self._pending}
        self._pending.clear()
        self._by_path.clear()
        return digests

    def _write(self, path: Path, data: bytes) -> str:
        # Unique: the same file may be written again while its first write is still pending.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
            try:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(fd, view[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)  # a symlink at the final name is replaced, not followed
            return hashlib.sha256(data).hexdigest()
        except BaseException:
            _removed(tmp)
            self._failed.set()
            raise
        finally:
            with self._room:
                self._pending_bytes -= len(data)
                self._room.notify_all()


def _removed(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _classified(exc: BaseException) -> BaseException:
    """A write error that will repeat (full disk, no permission) as DestinationUnwritable."""
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return DestinationUnwritable(
            f"the destination folder cannot be written: {os.strerror(exc.errno)}")
    return exc


def sync_folders(folders: Iterable[Path]) -> None:
    """Make the renames into these folders durable (fsync each folder)."""
    for folder in set(folders):
        _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A documented cache: the process's writing threads (FolderWriter), shared by all writers.
# fsync waits for the disk without the interpreter lock, and the file system groups
# concurrent flushes into fewer journal commits. Measured here (150 files of 0.53 MB, ext4):
# one fsync after each file 0.6-1.5 s, no fsync 0.3-0.5 s, flushes in 8 threads 0.5-0.7 s.
_pool = ThreadPoolExecutor(4, thread_name_prefix="adit-write")
