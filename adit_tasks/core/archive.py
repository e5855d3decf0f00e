"""Encrypted 7-Zip archives: AES-256, with encrypted headers so file names are hidden too.

The archive is written under a temporary name (`.<name>.part`) and renamed only when every
study of the job is in it, so a crash never leaves a plausible-looking partial archive.
Measured on a 79 MB CT study (shared DESIGN.md): py7zr's default LZMA2 runs at ~1 MB/s,
copy + AES-256 at ~75 MB/s. Copy is the default; `compress=True` uses LZMA2 preset 1
(~7 MB/s, about 2x smaller). zstd/brotli are not offered: stock 7-Zip cannot open them.

`read_entries` reads an archive back for `adit verify`: every file's size and SHA-256 in one
streaming pass (and the bytes of the few files asked for, the manifest).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import py7zr

from adit_tasks.core.errors import PermanentError
from adit_tasks.core.folder import sync_folders

COPY_AES = [{"id": py7zr.FILTER_COPY}, {"id": py7zr.FILTER_CRYPTO_AES256_SHA256}]
LZMA_AES = [{"id": py7zr.FILTER_LZMA2, "preset": 1},
            {"id": py7zr.FILTER_CRYPTO_AES256_SHA256}]


class ArchiveWriter:
    """One archive per transfer job, written by several studies (threads) in turn."""

    def __init__(self, path: Path, password: str, *, compress: bool = False) -> None:
        if not password:
            raise PermanentError("an archive password is required (ADIT_ARCHIVE_PASSWORD)")
        self.path = path
        self.partial = path.with_name(f".{path.name}.part")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.partial.unlink(missing_ok=True)  # left over by a crashed run: start again
        self._archive = py7zr.SevenZipFile(self.partial, "w", password=password,
                                           header_encryption=True,
                                           filters=LZMA_AES if compress else COPY_AES)
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def names(self) -> set[str]:
        with self._lock:
            return set(self._names)

    def add(self, arcname: str, data: bytes) -> bool:
        """Add one file; a name already written (by an earlier try of a study) is skipped.
        Whether it was written."""
        with self._lock:
            if arcname in self._names:
                return False
            self._archive.writestr(data, arcname)
            self._names.add(arcname)
            return True

    def finish(self) -> Path:
        """Close the archive and give it its final name."""
        with self._lock:
            self._archive.close()
            self._closed = True
            with open(self.partial, "rb") as f:
                os.fsync(f.fileno())  # every byte on disk before the name says "complete"
            os.replace(self.partial, self.path)
            sync_folders([self.path.parent])
        return self.path

    def abandon(self) -> None:
        """Close and delete the unfinished archive (a re-run starts it again); nothing once
        the archive is finished."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._archive.close()
            finally:
                self.partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class Entry:
    """One file of an archive as read back: its size and SHA-256 (hex)."""

    size: int
    sha256: str


class ArchiveUnreadable(PermanentError):
    """The archive cannot be opened or read: wrong password, damaged, or not a 7-Zip file."""


def read_entries(path: Path, password: str, *, keep: frozenset[str] = frozenset(),
                 limit: int = 64 * 2**20) -> tuple[dict[str, Entry], dict[str, bytes]]:
    """Every file of the archive (name -> size and SHA-256) and the bytes of the files named
    in `keep` (up to `limit` bytes each), in one pass that holds no other file in memory.

    ArchiveUnreadable when the password is wrong (the header is encrypted, so a wrong password
    is found on opening), the archive is damaged (a CRC or decryption error) or is no archive.
    """
    factory = _HashingFactory(keep, limit)
    try:
        with py7zr.SevenZipFile(path, "r", password=password) as archive:
            archive.extractall(factory=factory)
    except OSError as exc:
        raise ArchiveUnreadable(f"{path.name}: cannot be read ({os.strerror(exc.errno)})"
                                if exc.errno else f"{path.name}: cannot be read") from None
    except Exception:  # py7zr raises many kinds here (Bad7zFile, CrcError, LZMAError, ...)
        raise ArchiveUnreadable(f"{path.name}: cannot be opened: wrong password, or the "
                                "archive is damaged") from None
    entries = {name: Entry(f.size(), f.hash.hexdigest()) for name, f in factory.files.items()}
    return entries, {name: bytes(factory.files[name].kept) for name in keep
                     if name in factory.files}


class _HashingFile(py7zr.Py7zIO):
    """Where py7zr writes one file: hashed on the fly, its bytes kept only when asked."""

    def __init__(self, keep: bool, limit: int) -> None:
        self.hash = hashlib.sha256()
        self._size = 0
        self._keep, self._limit = keep, limit
        self.kept = bytearray()

    def write(self, s: bytes | bytearray) -> int:
        self.hash.update(s)
        self._size += len(s)
        if self._keep and len(self.kept) < self._limit:
            self.kept += s
        return len(s)

    def read(self, size: int | None = None) -> bytes:
        return b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def flush(self) -> None:
        pass

    def size(self) -> int:
        return self._size


class _HashingFactory(py7zr.WriterFactory):
    def __init__(self, keep: frozenset[str], limit: int) -> None:
        self.files: dict[str, _HashingFile] = {}
        self._keep, self._limit = keep, limit

    def create(self, filename: str) -> py7zr.Py7zIO:
        self.files[filename] = _HashingFile(filename in self._keep, self._limit)
        return self.files[filename]
