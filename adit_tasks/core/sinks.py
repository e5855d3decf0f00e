"""Where a study goes: a DICOM server (C-STORE or STOW-RS), a folder, or an encrypted archive.

Every sink answers two questions the same way, so a transfer can skip what is already there
and verify what arrived: `present(study)` lists the SOPInstanceUIDs the destination holds for
that study, and `write(study, instances)` stores a stream of instances.

Folder and archive sinks given a job's manifest (`core/manifest.py`) record a row for each
file they write (hashed from the bytes in memory) and each study folder they look at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from adit_tasks.core.archive import ArchiveWriter
from adit_tasks.core.association import Connection
from adit_tasks.core.dicomweb import qido_instance_uids, stow_instances
from adit_tasks.core.find import manifest
from adit_tasks.core.folder import FolderWriter, safe_component
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.manifest import JobManifest, Row
from adit_tasks.core.store import StoreResult, store_instances


@dataclass(frozen=True)
class StudyTarget:
    """A study as the destination will hold it (pseudonymized UIDs and names if so).

    `folder` is the study's relative folder (`<patient>/<study>`) in folder and archive sinks,
    stable for the life of the study (a study that grows keeps its folder); `pseudonymized`
    switches series folders to series number + modality (no free text).
    """

    study_uid: str
    folder: Path
    pseudonymized: bool


class Sink(Protocol):
    def present(self, study: StudyTarget) -> set[str]: ...

    def write(self, study: StudyTarget, instances: Iterable[DicomInstance]) -> StoreResult: ...


class FileSink(Sink, Protocol):
    """A sink that holds files (folder, archive): it also takes files that are not DICOM
    instances (NIfTI volumes, sidecars), at a path relative to the study's folder."""

    def add_file(self, study: StudyTarget, relative: Path, data: bytes, *,
                 series_uid: str = "", kind: str = "file") -> Path: ...


def series_folder(instance: DicomInstance, pseudonymized: bool) -> str:
    """`<SeriesNumber>-<SeriesDescription>`, or `<SeriesNumber>-<Modality>` when pseudonymized."""
    number = safe_component(instance.series_number, "0")
    if pseudonymized:
        return f"{number}-{safe_component(instance.modality, 'OT')}"
    return f"{number}-{safe_component(instance.series_description, 'series')}"


def instance_path(study: StudyTarget, instance: DicomInstance) -> Path:
    return (study.folder / series_folder(instance, study.pseudonymized)
            / f"{instance.sop_instance_uid}.dcm")


class ServerSink:
    """A DICOM server by C-STORE; presence is checked with an image-level C-FIND."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def present(self, study: StudyTarget) -> set[str]:
        if not self.conn.node.find:
            return set()
        return set(manifest(self.conn, study.study_uid).instances)

    def write(self, study: StudyTarget, instances: Iterable[DicomInstance]) -> StoreResult:
        return store_instances(self.conn, instances)


class DicomWebSink:
    """A DICOMweb server by STOW-RS; presence is checked with QIDO-RS."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def present(self, study: StudyTarget) -> set[str]:
        return qido_instance_uids(self.conn.node, study.study_uid, slot=self.conn.slot)

    def write(self, study: StudyTarget, instances: Iterable[DicomInstance]) -> StoreResult:
        return StoreResult(stored=stow_instances(self.conn.node, instances, slot=self.conn.slot))


class FolderSink:
    """One file per instance in a readable tree; a file exists only once complete and on
    disk (adit_tasks.core.folder). A file counts as present only if it looks like DICOM."""

    def __init__(self, root: Path, manifest: JobManifest | None = None) -> None:
        self.root = root
        self.manifest = manifest

    def present(self, study: StudyTarget) -> set[str]:
        if self.manifest is not None:
            self.manifest.touch(study.folder)
        folder = self.root / study.folder
        if not folder.is_dir():
            return set()
        return {p.stem for p in folder.glob("*/*.dcm") if _looks_like_dicom(p)}

    def write(self, study: StudyTarget, instances: Iterable[DicomInstance]) -> StoreResult:
        result = StoreResult()
        writer = FolderWriter(self.root)
        rows: list[Row] = []  # without their digests yet (the writing threads hash)
        try:
            for instance in instances:
                relative = instance_path(study, instance)
                writer.write(relative, instance.data)
                rows.append(Row(instance.study_uid, instance.series_uid,
                                instance.sop_instance_uid, relative.as_posix(),
                                len(instance.data), "", "dicom"))
                result.stored.append(instance.sop_instance_uid)
        finally:
            digests = writer.finish()  # raises if a write failed: then no row is recorded
        # Rows only for files on disk (a file that made it without its row gets one from
        # the disk when the manifest is written).
        if self.manifest is not None:
            for row in rows:
                self.manifest.record(replace(row, sha256=digests[Path(row.path)]))
        return result

    def add_file(self, study: StudyTarget, relative: Path, data: bytes, *,
                 series_uid: str = "", kind: str = "file") -> Path:
        """Write one non-instance file into the study's folder; its path below the root."""
        path = study.folder / relative
        # The row first (a wrong kind fails before anything is written); the writer hashes.
        row = Row(study.study_uid, series_uid, "", path.as_posix(), len(data), "", kind)
        writer = FolderWriter(self.root)
        writer.write(path, data)
        digests = writer.finish()
        if self.manifest is not None:
            self.manifest.record(replace(row, sha256=digests[path]))
        return path


def _looks_like_dicom(path: Path) -> bool:
    """A Part 10 file: more than a preamble, with the DICM prefix (a zero-byte or cut file
    left by another tool is not 'present')."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


class ArchiveSink:
    """Files in an encrypted 7-Zip archive shared by all studies of one transfer job."""

    def __init__(self, writer: ArchiveWriter, manifest: JobManifest | None = None) -> None:
        self.writer = writer
        self.manifest = manifest

    def present(self, study: StudyTarget) -> set[str]:
        prefix = study.folder.as_posix() + "/"
        return {Path(n).stem for n in self.writer.names() if n.startswith(prefix)}

    def write(self, study: StudyTarget, instances: Iterable[DicomInstance]) -> StoreResult:
        result = StoreResult()
        for instance in instances:
            relative = instance_path(study, instance)
            if self.writer.add(relative.as_posix(), instance.data):
                _record(self.manifest, relative, instance)
            result.stored.append(instance.sop_instance_uid)
        return result

    def add_file(self, study: StudyTarget, relative: Path, data: bytes, *,
                 series_uid: str = "", kind: str = "file") -> Path:
        """Add one non-instance file into the study's folder; its name in the archive."""
        path = study.folder / relative
        row = _row(self.manifest, study, path, data, series_uid, kind)
        if self.writer.add(path.as_posix(), data) and self.manifest is not None and row is not None:
            self.manifest.record(row)
        return path


def _row(manifest: JobManifest | None, study: StudyTarget, path: Path, data: bytes,
         series_uid: str, kind: str) -> Row | None:
    """The manifest row of a non-instance file (before it is written: a wrong kind fails
    first), None when no manifest is kept."""
    if manifest is None:
        return None
    return Row.of(path, data, study_uid=study.study_uid, series_uid=series_uid, kind=kind)


def _instance_row(relative: Path, instance: DicomInstance) -> Row:
    return Row.of(relative, instance.data, study_uid=instance.study_uid,
                  series_uid=instance.series_uid, sop_instance_uid=instance.sop_instance_uid,
                  kind="dicom")


def _record(manifest: JobManifest | None, relative: Path, instance: DicomInstance) -> None:
    if manifest is not None:
        manifest.record(_instance_row(relative, instance))
