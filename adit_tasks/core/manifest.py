"""Per-job manifests of folder and archive deliveries, and `adit verify` of a delivery.

While a job writes, its sink records one `Row` per file (`JobManifest.record`, thread-safe:
studies run in parallel): the study, series and SOP instance UIDs as written (the new ones when
pseudonymizing), the path relative to the folder or archive (posix), size, SHA-256 of the bytes
written (hashed from memory, never read back) and the kind (dicom, nifti, sidecar, file). At
the end of the job the manifest is written twice, with the same rows:

- `<job>.json`: `{"format": "adit-manifest/1", "header": {...}, "rows": [...]}`, the complete
  manifest and the one `adit verify` reads. The header: job key, the flow run (name, id) and
  time (UTC) of this write and of every earlier write (`runs`), source and destination node,
  the transfer options, the CID 7050 codes applied (pseudonymizing jobs), files and bytes.
- `<job>.csv`: the rows alone, one per file (columns `ROW_FIELDS`), through `core/tables.py`
  (cells a spreadsheet would run are neutralised); no comment lines, so a spreadsheet or a
  CSV reader opens it as a plain table. The header is in the JSON only.

Where: a folder destination holds many jobs, so `<root>/manifests/<job>.json` and `.csv`
(`<job>` = `plan.job_key`: the same for a re-run of the same job); an archive (one per job)
holds `manifest.json` and `manifest.csv`, added just before it is finished.

Re-runs: rows are keyed by path. A folder job's manifest merges the earlier one: rows of
earlier runs are kept, rows written again replace theirs, nothing is listed twice. A file that
ADIT counts as present in a study folder of the job (a `*/*.dcm` instance) but no row lists
(a crashed first run, or a deleted manifest) gets its row rebuilt from the file on disk. An
archive is written whole by one run (a re-run of a finished archive does nothing), so its
rows are always this run's. Merges run one at a time per destination folder (an flock on
it), so two runs of one job ending together both keep their rows. A continuous job's runs
each write their own manifest into the job's folder (`plan.standing_job_key`).

Nothing here holds an original identifier of a pseudonymizing job: the rows hold the UIDs and
paths as written; the header holds node names, options (a pseudonym is not an original
identifier) and codes.

Verification (`verify_folder`, `verify_archive`) returns a typed `Report`: files listed but
missing, files whose size or SHA-256 differ, and extra files (in a folder: under the study
folders the manifests cover, ADIT's `.part` temporaries aside; in an archive: any entry but
the manifest). A manifest that cannot be read, or an archive that cannot be opened, is
`CannotVerify`. Manifests read back are peer input: every row is checked (paths relative,
inside the delivery; sizes, hashes and kinds well-formed) before anything is compared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from adit_tasks.core.archive import ArchiveUnreadable, ArchiveWriter, read_entries
from adit_tasks.core.errors import AditError, InvalidInstance
from adit_tasks.core.folder import write_atomically
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.tables import write_table

logger = logging.getLogger(__name__)

FORMAT = "adit-manifest/1"
KINDS = ("dicom", "nifti", "sidecar", "file")
ROW_FIELDS = ("study_uid", "series_uid", "sop_instance_uid", "path", "size", "sha256", "kind")
FOLDER = "manifests"  # the manifests' folder in a folder destination
IN_ARCHIVE = ("manifest.json", "manifest.csv")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CannotVerify(AditError):
    """The delivery cannot be checked: no manifest, an unreadable one, or an archive that
    does not open (wrong password)."""


@dataclass(frozen=True)
class Row:
    """One file of a delivery."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    path: str  # relative to the folder or archive, posix
    size: int
    sha256: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind of file '{self.kind}' (one of {', '.join(KINDS)})")

    @classmethod
    def of(cls, path: Path, data: bytes, *, study_uid: str, series_uid: str = "",
           sop_instance_uid: str = "", kind: str = "file") -> Row:
        """The row of `data` written at `path` (hashed here, once)."""
        return cls(study_uid, series_uid, sop_instance_uid, path.as_posix(), len(data),
                   hashlib.sha256(data).hexdigest(), kind)


@dataclass(frozen=True)
class Job:
    """What the header says about the job (all of it known when the plan is built)."""

    key: str
    source: str
    destination: str
    options: Mapping[str, Any]
    codes: tuple[tuple[str, str], ...] = ()  # CID 7050 (CodeValue, CodeMeaning) applied


@dataclass(frozen=True)
class RunInfo:
    """The run writing the manifest: passed down by the Prefect layer as plain values."""

    flow_run_id: str
    flow_run_name: str
    written: str  # UTC, ISO 8601


@dataclass(eq=False)  # identity: a plan (frozen, hashable) holds it
class JobManifest:
    """The manifest of one job while it writes: rows recorded by the sink (any thread) and
    the study folders it looked at. `root` is the folder destination (None: an archive)."""

    job: Job
    root: Path | None = None
    _rows: dict[str, Row] = field(default_factory=dict)
    _folders: set[Path] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, row: Row) -> None:
        with self._lock:
            self._rows[row.path] = row

    def touch(self, folder: Path) -> None:
        """A study folder of this job (its present files without a row get one rebuilt)."""
        with self._lock:
            self._folders.add(folder)

    def rows(self) -> list[Row]:
        with self._lock:
            return list(self._rows.values())

    def write_to_folder(self, run: RunInfo) -> Path:
        """Merge with the job's earlier manifest, rebuild missing rows of present files,
        write JSON and CSV atomically; the JSON's path."""
        assert self.root is not None, "an archive's manifest goes into the archive"
        json_path = Path(FOLDER) / f"{self.job.key}.json"
        with _merging(self.root):  # a re-run of the job at the same time waits its turn
            earlier = _earlier(self.root / json_path)
            rows = {r.path: r for r in earlier.rows} if earlier else {}
            rows.update((r.path, r) for r in self.rows())
            with self._lock:
                folders = sorted(self._folders)
            for folder in folders:
                rows.update((r.path, r) for r in _rebuilt_rows(self.root, folder, set(rows)))
            manifest = Manifest.of(self.job, run, rows.values(), earlier)
            write_atomically(self.root, json_path.with_suffix(".csv"), manifest.csv_bytes())
            return write_atomically(self.root, json_path, manifest.json_bytes())

    def write_into(self, archive: ArchiveWriter, run: RunInfo) -> None:
        """Add `manifest.json` and `manifest.csv` (call before `finish()`)."""
        manifest = Manifest.of(self.job, run, self.rows(), None)
        archive.add(IN_ARCHIVE[0], manifest.json_bytes())
        archive.add(IN_ARCHIVE[1], manifest.csv_bytes())


@dataclass(frozen=True)
class Manifest:
    """A manifest as written or read back."""

    header: Mapping[str, Any]
    rows: tuple[Row, ...]

    @classmethod
    def of(cls, job: Job, run: RunInfo, rows: Iterable[Row], earlier: Manifest | None,
           ) -> Manifest:
        ordered = tuple(sorted(rows, key=lambda r: r.path))
        runs = list(earlier.header.get("runs", [])) if earlier else []
        runs.append(asdict(run))
        header = {
            "job": job.key, **asdict(run), "source": job.source,
            "destination": job.destination, "options": dict(job.options),
            "deidentification_method_codes": [
                {"code_value": v, "coding_scheme": "DCM", "code_meaning": m}
                for v, m in job.codes],
            "files": len(ordered), "bytes": sum(r.size for r in ordered), "runs": runs}
        return cls(header, ordered)

    def json_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "header": self.header,
                           "rows": [asdict(r) for r in self.rows]},
                          indent=1, ensure_ascii=False).encode("utf-8")

    def csv_bytes(self) -> bytes:
        """UTF-8 with BOM, as `write_table` writes CSV files (Excel shows umlauts)."""
        text = io.StringIO()
        write_table([asdict(r) for r in self.rows], text)
        return (text.getvalue() or ",".join(ROW_FIELDS) + "\r\n").encode("utf-8-sig")

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """A manifest read back (peer input: checked row by row); CannotVerify naming the
        row and field that is wrong, never its value."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CannotVerify(f"{where}: not a readable manifest (invalid JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CannotVerify(f"{where}: not an ADIT manifest (format is not {FORMAT})")
        header, rows = doc.get("header"), doc.get("rows")
        if not isinstance(header, dict) or not isinstance(rows, list):
            raise CannotVerify(f"{where}: no header or no rows")
        return cls(header, tuple(_checked_row(r, n, where) for n, r in enumerate(rows, 1)))


def _checked_row(raw: object, n: int, where: str) -> Row:
    def bad(name: str) -> CannotVerify:
        return CannotVerify(f"{where}: row {n}: field '{name}' is missing or invalid")

    if not isinstance(raw, dict):
        raise bad("row")
    values: dict[str, Any] = {}
    for name in ROW_FIELDS:
        value = raw.get(name)
        if name == "size":
            if type(value) is not int or value < 0:
                raise bad(name)
        elif not isinstance(value, str):
            raise bad(name)
        values[name] = value
    if not _SHA256.fullmatch(values["sha256"]):
        raise bad("sha256")
    if values["kind"] not in KINDS:
        raise bad("kind")
    path = PurePosixPath(values["path"])
    if (not values["path"] or path.is_absolute() or ".." in path.parts or "\\" in values["path"]
            or values["path"] != path.as_posix()):
        raise bad("path")
    return Row(**values)


@contextlib.contextmanager
def _merging(root: Path) -> Iterator[None]:
    """An exclusive lock on the destination folder (flock on its directory: across threads,
    processes and their crashes, released by the kernel) while a manifest is read, merged
    and written, so that two runs of one job never lose each other's rows."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _earlier(path: Path) -> Manifest | None:
    """The job's manifest of an earlier run, if one can be read (else its rows are rebuilt
    from the files)."""
    if not path.is_file():
        return None
    try:
        return Manifest.from_json(path.read_bytes(), path.name)
    except (OSError, CannotVerify) as exc:
        logger.warning("earlier manifest not read, rebuilt from the files: %s", exc)
        return None


def _rebuilt_rows(root: Path, folder: Path, listed: set[str]) -> list[Row]:
    """Rows for instances ADIT counts as present in a study folder (`*/*.dcm`, Part 10) that
    no row lists: read, checked and hashed from disk."""
    rows = []
    for file in sorted((root / folder).glob("*/*.dcm")):
        relative = file.relative_to(root)
        if relative.as_posix() in listed:
            continue
        try:
            instance = DicomInstance.from_bytes(file.read_bytes())
        except (OSError, InvalidInstance):
            continue  # not vouched for: `adit verify` reports it as extra
        rows.append(Row.of(relative, instance.data, study_uid=instance.study_uid,
                           series_uid=instance.series_uid,
                           sop_instance_uid=instance.sop_instance_uid, kind="dicom"))
    return rows


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What `adit verify` found: paths relative to the delivery, sorted."""

    manifests: int
    files: int  # files listed
    missing: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # size or SHA-256 differ (or unreadable)
    extra: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra)


def verify_folder(folder: Path) -> Report:
    """Check a folder destination against every manifest in `folder/manifests`."""
    if not folder.is_dir():
        raise CannotVerify(f"{folder}: no such folder")
    # A job's manifest, and a continuous job's one per run in the job's own folder.
    paths = sorted([*(folder / FOLDER).glob("*.json"), *(folder / FOLDER).glob("*/*.json")])
    if not paths:
        raise CannotVerify(f"{folder}: no manifest (expected {FOLDER}/<job>.json)")
    expected: dict[str, set[tuple[int, str]]] = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CannotVerify(f"{path.relative_to(folder).as_posix()}: cannot be read "
                               f"({exc.strerror})") from None
        shown = path.relative_to(folder).as_posix()
        for row in Manifest.from_json(data, shown).rows:
            # The same file in two jobs' manifests (overlapping jobs) must match one of them.
            expected.setdefault(row.path, set()).add((row.size, row.sha256))
    root = folder.resolve()
    missing, changed = [], []
    for relative, versions in sorted(expected.items()):
        file = (folder / relative).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            missing.append(relative)
            continue
        try:
            size = file.stat().st_size
            if not any(size == s for s, _ in versions) or _sha256_of(file) not in {
                    h for s, h in versions if s == size}:
                changed.append(relative)
        except OSError:
            changed.append(relative)
    extra = []
    for study in sorted({_study_folder(p) for p in expected} - {""}):
        base = folder / study
        if not base.is_dir() or base.is_symlink():
            continue
        for file in sorted(base.rglob("*")):
            relative = file.relative_to(folder).as_posix()
            if file.is_file() and relative not in expected and not _temporary(file.name):
                extra.append(relative)
    return Report(len(paths), len(expected), tuple(missing), tuple(changed), tuple(extra))


def verify_archive(path: Path, password: str) -> Report:
    """Check an archive against the `manifest.json` inside it; CannotVerify when it does not
    open (wrong password, damaged) or holds no manifest."""
    if not path.is_file():
        raise CannotVerify(f"{path}: no such file")
    if not password:
        raise CannotVerify(f"{path.name}: the archive password is needed "
                           "(ADIT_ARCHIVE_PASSWORD)")
    try:
        entries, kept = read_entries(path, password, keep=frozenset(IN_ARCHIVE[:1]))
    except ArchiveUnreadable as exc:
        raise CannotVerify(str(exc)) from None
    if IN_ARCHIVE[0] not in kept:
        raise CannotVerify(f"{path.name}: holds no {IN_ARCHIVE[0]}")
    rows = Manifest.from_json(kept[IN_ARCHIVE[0]], f"{path.name}: {IN_ARCHIVE[0]}").rows
    listed = {r.path: r for r in rows}
    missing = sorted(p for p in listed if p not in entries)
    changed = sorted(p for p, r in listed.items() if p in entries
                     and (entries[p].size, entries[p].sha256) != (r.size, r.sha256))
    extra = sorted(n for n in entries if n not in listed and n not in IN_ARCHIVE)
    return Report(1, len(listed), tuple(missing), tuple(changed), tuple(extra))


def _study_folder(relative: str) -> str:
    """`<patient>/<study>` of a path in a delivery (what a study's files are under)."""
    parts = PurePosixPath(relative).parts
    return "/".join(parts[:2]) if len(parts) > 2 else "/".join(parts[:-1])


def _temporary(name: str) -> bool:
    """ADIT's own temporary files (`.<name>.part`, left by a write that was cut short)."""
    return name.startswith(".") and name.endswith(".part")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
