"""NIfTI output: each series of a study as a NIfTI-1 volume (`.nii.gz`) with its BIDS JSON
sidecar, made by dcm2niix from the instances as they are written (option `nifti`).

`NiftiSink` wraps the folder or archive sink of a plan (`plan.transfer_plan`):

- `also`: the DICOM files go to the wrapped sink as before, and each series is converted too;
  `only`: the DICOM files go to a temporary folder only, the destination gets the NIfTI files.
- The instances it receives are pseudonymized already when the job is, so dcm2niix never sees
  an original value. What dcm2niix writes is still checked, as any peer's output: it copies
  header values into the sidecar and the NIfTI header (ImageComments into `aux_file`, the
  acquisition time into `descrip`, the institution into the sidecar even with `-ba y`).
- Files enter the destination only through `FileSink.add_file`, as `<series folder>/nifti/
  <SeriesNumber>-<Modality>-<digest>.nii.gz` and `.json` (`.bval`/`.bvec` for diffusion;
  dcm2niix's own suffixes, such as `_e2`, when it splits a series). The digest (8 hex of the
  destination SeriesInstanceUID) keeps two series with the same number apart. No free text in
  any name.
- dcm2niix runs once per series, in a temporary folder, with a timeout and without its
  defaults file; its output is checked (only the expected names, regular files, sizes bounded,
  a little-endian NIfTI-1 header whose dimensions match the file size, a JSON object), and its
  stdout and stderr are never read: they can print header values.
- Sidecar: dcm2niix's anonymized BIDS sidecar (`-ba y`: no patient name, ID, birth date,
  accession, UIDs or AcquisitionDateTime). When pseudonymizing, only the keys of an allow-list
  stay (`sidecar_keys`: acquisition parameters always; SeriesDescription and ProtocolName
  under clean_descriptors, as cleaned in the DICOM; device identity under
  retain_device_identity; times only when dates are kept), and the text fields of the NIfTI
  header (descrip, aux_file, db_name, data_type, intent_name) are blanked. An allow-list and
  not a deny-list because dcm2niix adds keys from version to version and copies free text
  even in its anonymized mode: a key nobody looked at does not go out.
- Not convertible, skipped with a note in the study's result (status warning: the
  destination lacks something the job asked for): SOP classes that are not image volumes
  (SR, KO, PR, secondary capture, ...), single images and localizers. dcm2niix failing on a
  series that should convert fails the study: `ConversionFailed` (permanent: the same bytes
  give the same result) or, for a timeout, a kill by a signal or a write error in the
  temporary folder, `ConversionInterrupted` (retriable).

Re-runs. A small record per series (`<stem>.adit.json`, also through `add_file`) lists the
destination SOPInstanceUIDs that were converted (or skipped). `present()` reports an instance
only when its series has a record (and, for `also`, its DICOM file is there too), so a series
never converted - also one cut short by a failure - is sent whole again (its DICOM files
rewritten with the same bytes, or skipped by the archive) and converted once. A series that
grew since it was converted cannot be converted again from what arrives: only its new
instances come, and in `only` mode the old ones are nowhere. Its record is marked stale and
the study fails with `SeriesGrew` (retriable); the retry's `present()` leaves that series out,
so it is retrieved whole and converted again under the same names. An archive cannot replace
an entry and is written in one run: there a series that grew fails the study for good and the
job's next run writes a new archive.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.uid import UID

from adit_tasks.core.deid_rules import PseudonymizationOptions
from adit_tasks.core.errors import ConfigError, PermanentError, RetriableError
from adit_tasks.core.folder import safe_component
from adit_tasks.core.instances import DicomInstance, raw_value
from adit_tasks.core.sinks import FileSink, FolderSink, StudyTarget, series_folder
from adit_tasks.core.store import StoreResult

logger = logging.getLogger(__name__)

NiftiMode = Literal["only", "also"]
TOOL = "dcm2niix"
TIMEOUT_SECONDS = 600.0  # one series; a 1,000-slice CT converts in a few seconds
MAX_NIFTI_BYTES = 4 * 2**30  # one uncompressed volume (held in memory to be cleaned)
MAX_TEXT_BYTES = 2**20  # a sidecar, bval or bvec file, a record
MAX_OUTPUTS = 64  # files dcm2niix may make of one series (echoes, phases, ...)
# gzip level 1: 37 MB/s on a 79 MB CT volume here, level 6 (gzip's default) 7 MB/s for a
# file 3% smaller; dcm2niix itself takes 0.1 s for that series.
GZIP_LEVEL = 1

# What dcm2niix makes of one series with `-f series`: the name we gave, its suffixes
# (letters, digits, underscores: `_e2`, `_ph`, `_Eq_1`, `a`), one of these extensions.
_OUTPUT = re.compile(r"series([A-Za-z0-9_]{0,40})\.(nii|json|bval|bvec)")
_NUMBERS = re.compile(rb"[0-9eE+\-. \t\r\n]*")

SINGLE_FRAME_VOLUMES = {
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
}
MULTI_FRAME_VOLUMES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
}

# The sidecar keys kept when pseudonymizing (see the module docstring). Acquisition
# parameters: numbers, codes and vendor sequence/coil/kernel names, kept in the DICOM too.
TECHNICAL_KEYS = frozenset({
    "Modality", "MagneticFieldStrength", "ImagingFrequency", "Manufacturer",
    "ManufacturersModelName", "BodyPartExamined", "PatientPosition", "MRAcquisitionType",
    "SeriesNumber", "AcquisitionNumber", "ImageType", "ScanningSequence", "SequenceVariant",
    "ScanOptions", "SequenceName", "PulseSequenceName", "PulseSequenceDetails", "SliceThickness",
    "SpacingBetweenSlices", "SAR", "NumberOfAverages", "EchoNumber", "EchoTime", "EchoTime1",
    "EchoTime2", "RepetitionTime", "InversionTime", "FlipAngle", "PartialFourier",
    "BaseResolution", "ShimSetting", "TxRefAmp", "PhaseResolution", "ReceiveCoilName",
    "ReceiveCoilActiveElements", "CoilString", "CoilCombinationMethod", "MatrixCoilMode",
    "PercentPhaseFOV", "PercentSampling", "EchoTrainLength", "PhaseEncodingSteps",
    "AcquisitionMatrixPE", "ReconMatrixPE", "BandwidthPerPixelPhaseEncode",
    "EffectiveEchoSpacing", "DerivedVendorReportedEchoSpacing", "TotalReadoutTime",
    "PixelBandwidth", "DwellTime", "PhaseEncodingAxis", "PhaseEncodingDirection", "SliceTiming",
    "SliceEncodingDirection", "ImageOrientationPatientDICOM", "ImageOrientationText",
    "InPlanePhaseEncodingDirectionDICOM", "MultibandAccelerationFactor",
    "ParallelReductionFactorInPlane", "ParallelReductionOutOfPlane",
    "ParallelAcquisitionTechnique", "MTState", "SpoilingState", "WaterFatShift",
    "NonlinearGradientCorrection", "DiffusionScheme", "AcquisitionDuration", "FrameTimesStart",
    "FrameDuration", "Units", "ConvolutionKernel", "ExposureTime", "XRayTubeCurrent",
    "XRayExposure", "ReconstructionMethod", "RawImage", "ConversionSoftware",
    "ConversionSoftwareVersion"
})
DESCRIPTOR_KEYS = frozenset({"SeriesDescription", "ProtocolName"})
DEVICE_KEYS = frozenset({"DeviceSerialNumber", "StationName", "SoftwareVersions"})
TIME_KEYS = frozenset({"AcquisitionTime", "AcquisitionDateTime", "AcquisitionDate",
                       "ContentTime", "ContentDate", "SeriesTime", "SeriesDate"})
_NIFTI_TEXT_FIELDS = ((4, 14), (14, 32), (148, 228), (228, 252), (328, 344))  # offsets


class ConversionFailed(PermanentError):
    """dcm2niix could not convert a series that should convert, or wrote something else than
    expected: the same bytes will fail the same way."""


class ConversionInterrupted(RetriableError):
    """dcm2niix timed out, was killed, or could not write its temporary output."""


class SeriesGrew(RetriableError):
    """A series converted before has new instances: it is retrieved whole and converted again
    by the retry (module docstring, Re-runs)."""


class SeriesGrewInArchive(PermanentError):
    """A series grew while the job's archive was being written (entries cannot be replaced)."""


@dataclass(frozen=True)
class NiftiFile:
    """One checked output of dcm2niix, ready for the destination."""

    suffix: str  # what dcm2niix added to the name: '' or e.g. '_e2'
    extension: str  # '.nii.gz', '.json', '.bval', '.bvec'
    data: bytes
    kind: Literal["nifti", "sidecar"]


@dataclass(frozen=True)
class SeriesRecord:
    """What was done with one series: the destination instances converted (or skipped, with
    the reason); `stale` when the series grew since. `name` is where the record lives, below
    the study's folder (not stored in it)."""

    series_uid: str
    instances: frozenset[str]
    files: tuple[str, ...] = ()
    skipped: str = ""
    stale: bool = False
    name: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"series": self.series_uid, "instances": sorted(self.instances),
                           "files": list(self.files), "skipped": self.skipped,
                           "stale": self.stale}, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, name: str) -> SeriesRecord | None:
        """The record, or None for a file that is not one (damaged, edited: the series is
        then converted again)."""
        try:
            raw = json.loads(data)
            record = cls(raw["series"], frozenset(raw["instances"]), tuple(raw["files"]),
                         raw["skipped"], raw["stale"], name)
        except (ValueError, KeyError, TypeError):
            return None
        texts = [record.series_uid, *record.instances, *record.files, record.skipped]
        if not all(isinstance(t, str) for t in texts) or not isinstance(record.stale, bool):
            return None
        return record


def skip_reason(sop_class: str, instances: int, image_type: str) -> str:
    """Why dcm2niix is not asked to convert a series ('' when it is)."""
    if sop_class not in SINGLE_FRAME_VOLUMES | MULTI_FRAME_VOLUMES:
        return f"{UID(sop_class).name} is not an image volume"
    if "LOCALIZER" in image_type.upper().split("\\"):
        return "a localizer"
    if sop_class in SINGLE_FRAME_VOLUMES and instances < 2:
        return "a single image, not a volume"
    return ""


def sidecar_keys(deid: PseudonymizationOptions) -> frozenset[str]:
    """The sidecar keys a pseudonymized job keeps (module docstring)."""
    keys = TECHNICAL_KEYS
    if deid.clean_descriptors:
        keys |= DESCRIPTOR_KEYS
    if deid.retain_device_identity:
        keys |= DEVICE_KEYS
    if deid.dates == "keep":
        keys |= TIME_KEYS
    return keys


def clean_sidecar(data: bytes, deid: PseudonymizationOptions | None) -> bytes:
    """dcm2niix's sidecar checked (a JSON object) and, when pseudonymizing, reduced to the
    allowed keys with plain values (numbers, short texts, flat lists of them)."""
    try:
        sidecar = json.loads(data)
    except ValueError:  # also bad UTF-8
        raise ConversionFailed("dcm2niix wrote a sidecar that is not JSON") from None
    if not isinstance(sidecar, dict):
        raise ConversionFailed("dcm2niix wrote a sidecar that is not a JSON object")
    if deid is not None:
        allowed = sidecar_keys(deid)
        sidecar = {k: v for k, v in sidecar.items() if k in allowed and _plain(v)}
    return json.dumps(sidecar, indent=2, ensure_ascii=False).encode() + b"\n"


def _plain(value: object, nested: bool = False) -> bool:
    if isinstance(value, bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= 256
    if isinstance(value, list) and not nested:
        return len(value) <= 100_000 and all(_plain(v, nested=True) for v in value)
    return False


@dataclass(frozen=True)
class NiftiHeader:
    """What the checks (and the tests) read from a NIfTI-1 header."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]  # pixdim of each dimension (mm, then s)
    vox_offset: int


def read_header(data: bytes) -> NiftiHeader:
    """The header of a single-file NIfTI-1 volume (`.nii`, uncompressed), checked: sizes,
    magic, dimensions, and a file exactly as long as the header says. ConversionFailed."""
    if len(data) < 352 or struct.unpack_from("<i", data, 0)[0] != 348 \
            or data[344:348] != b"n+1\0":
        raise ConversionFailed("dcm2niix wrote a volume that is not a little-endian NIfTI-1 "
                               "file")
    dim = struct.unpack_from("<8h", data, 40)
    bitpix = struct.unpack_from("<h", data, 72)[0]
    pixdim = struct.unpack_from("<8f", data, 76)
    offset = struct.unpack_from("<f", data, 108)[0]
    ndim = dim[0]
    shape = dim[1:1 + ndim] if 1 <= ndim <= 7 else ()
    if not shape or min(shape) < 1 or bitpix not in (8, 16, 24, 32, 64, 128) \
            or not (352 <= offset <= 2**20) or offset != int(offset):
        raise ConversionFailed("dcm2niix wrote a NIfTI header with impossible values")
    if len(data) != int(offset) + math.prod(shape) * bitpix // 8:
        raise ConversionFailed("dcm2niix wrote a volume whose size does not match its header")
    return NiftiHeader(tuple(shape), tuple(pixdim[1:1 + ndim]), int(offset))


def clean_nifti(data: bytes, pseudonymizing: bool) -> bytes:
    """The checked volume, gzipped (no name, no time in the gzip header: the same volume
    gives the same bytes); when pseudonymizing, its text fields blanked and any header
    extension emptied (dcm2niix puts ImageComments in aux_file, times in descrip)."""
    header = read_header(data)
    if pseudonymizing:
        cleaned = bytearray(data[:header.vox_offset])
        for start, end in _NIFTI_TEXT_FIELDS:
            cleaned[start:end] = bytes(end - start)
        cleaned[348:] = bytes(len(cleaned) - 348)  # extension flag and extensions
        head = bytes(cleaned)
    else:
        head = data[:header.vox_offset]
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
        gz.write(head)
        gz.write(memoryview(data)[header.vox_offset:])  # no copy of the voxels
    return out.getvalue()


def convert_series(folder: Path, deid: PseudonymizationOptions | None, *, label: str,
                   timeout: float = TIMEOUT_SECONDS, tool: str = TOOL) -> list[NiftiFile]:
    """Run dcm2niix on the DICOM files of one series in `folder`; its outputs, checked and
    cleaned. `label` (series number and modality) names the series in errors."""
    with tempfile.TemporaryDirectory(prefix="adit-dcm2niix-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        command = [tool, "-b", "y", "-ba", "y", "-z", "n", "-f", "series", "-d", "0",
                   "-i", "n", "-v", "0", "-o", str(out), str(folder)]
        # HOME: dcm2niix reads a defaults file from there; ours is empty.
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": tmp, "LC_ALL": "C"}
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=env, timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise ConversionInterrupted(f"series {label}: dcm2niix did not finish within "
                                        f"{timeout:g} s") from None
        if done.returncode < 0 or done.returncode == 7:  # a signal; 7: cannot write
            raise ConversionInterrupted(f"series {label}: dcm2niix stopped (exit "
                                        f"{done.returncode})")
        if done.returncode != 0:
            raise ConversionFailed(f"series {label}: dcm2niix failed (exit {done.returncode})")
        files = _outputs(out, label)
        return [_checked(path, match, deid, label) for path, match in files]


def _outputs(out: Path, label: str) -> list[tuple[Path, re.Match[str]]]:
    found = []
    for path in sorted(out.iterdir()):
        match = _OUTPUT.fullmatch(path.name)
        if match is None or not stat.S_ISREG(path.lstat().st_mode):
            raise ConversionFailed(f"series {label}: dcm2niix wrote an unexpected file")
        found.append((path, match))
    if len(found) > MAX_OUTPUTS:
        raise ConversionFailed(f"series {label}: dcm2niix wrote {len(found)} files")
    if not any(m.group(2) == "nii" for _, m in found):
        raise ConversionFailed(f"series {label}: dcm2niix made no volume of it")
    return found


def _checked(path: Path, match: re.Match[str], deid: PseudonymizationOptions | None,
             label: str) -> NiftiFile:
    suffix, extension = match.groups()
    limit = MAX_NIFTI_BYTES if extension == "nii" else MAX_TEXT_BYTES
    if path.stat().st_size > limit:
        raise ConversionFailed(f"series {label}: dcm2niix wrote a file larger than "
                               f"{limit // 2**20} MiB")
    data = path.read_bytes()
    try:
        if extension == "nii":
            return NiftiFile(suffix, ".nii.gz", clean_nifti(data, deid is not None), "nifti")
        if extension == "json":
            return NiftiFile(suffix, ".json", clean_sidecar(data, deid), "sidecar")
    except ConversionFailed as exc:
        raise ConversionFailed(f"series {label}: {exc}") from None
    if not _NUMBERS.fullmatch(data):  # b-values and b-vectors: numbers only
        raise ConversionFailed(f"series {label}: dcm2niix wrote a .{extension} file that is "
                               "not numbers")
    return NiftiFile(suffix, f".{extension}", data, "sidecar")


def series_stem(instance: DicomInstance) -> str:
    """`<SeriesNumber>-<Modality>-<8 hex of the SeriesInstanceUID>`: no free text, and two
    series with the same number stay apart."""
    digest = hashlib.sha256(instance.series_uid.encode()).hexdigest()[:8]
    return f"{_label(instance)}-{digest}"


def _label(instance: DicomInstance) -> str:
    return (f"{safe_component(instance.series_number, '0')}-"
            f"{safe_component(instance.modality, 'OT')}")


@dataclass
class _Series:
    """The instances of one series that arrived, as files in a temporary folder."""

    first: DicomInstance
    folder: Path
    uids: set[str] = field(default_factory=set)

    def add(self, instance: DicomInstance) -> None:
        if instance.sop_instance_uid in self.uids:
            return
        (self.folder / f"{len(self.uids):06d}.dcm").write_bytes(instance.data)
        self.uids.add(instance.sop_instance_uid)

    @property
    def image_type(self) -> str:
        ds = dcmread(io.BytesIO(self.first.data), stop_before_pixels=True,
                     specific_tags=["ImageType"])
        return raw_value(ds, "ImageType")


class _Spool:
    """Instances of a stream, copied into one temporary folder per series as they pass."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.series: dict[str, _Series] = {}

    def tee(self, instances: Iterable[DicomInstance]) -> Iterator[DicomInstance]:
        for instance in instances:
            series = self.series.get(instance.series_uid)
            if series is None:
                folder = self.root / str(len(self.series))
                folder.mkdir()
                series = self.series[instance.series_uid] = _Series(instance, folder)
            series.add(instance)
            yield instance


class NiftiSink:
    """A folder or archive sink that also (`also`) or only (`only`) writes each series as
    NIfTI; see the module docstring. `deid`: the pseudonymization options of the job (None
    when it does not pseudonymize)."""

    def __init__(self, inner: FileSink, mode: NiftiMode,
                 deid: PseudonymizationOptions | None = None, *,
                 timeout: float = TIMEOUT_SECONDS, tool: str = TOOL) -> None:
        if shutil.which(tool) is None:
            raise ConfigError(f"NIfTI output needs {tool} (Debian package dcm2niix, installed "
                              "by make install)")
        self.inner, self.mode, self.deid = inner, mode, deid
        self.timeout, self.tool = timeout, tool
        self._records: dict[tuple[str, str], SeriesRecord] = {}  # (study folder, series)
        self._lock = threading.Lock()

    def present(self, study: StudyTarget) -> set[str]:
        recorded = {uid for record in self.records(study).values() if not record.stale
                    for uid in record.instances}
        if self.mode == "only":
            return recorded
        return self.inner.present(study) & recorded

    def write(self, study: StudyTarget, instances: Iterable[DicomInstance]) -> StoreResult:
        known = self.records(study)
        with tempfile.TemporaryDirectory(prefix="adit-nifti-") as tmp:
            spool = _Spool(Path(tmp))
            if self.mode == "also":
                result = self.inner.write(study, spool.tee(instances))
            else:
                result = StoreResult()
                for _ in spool.tee(instances):
                    pass
            skipped, grew = [], []
            for series in spool.series.values():
                old = known.get(series.first.series_uid)
                if old is not None and not old.stale:
                    if not series.uids <= old.instances:
                        grew.append(_label(series.first))
                        self._save(study, dataclasses.replace(old, stale=True))
                    # else only DICOM copies were missing: the NIfTI files are there
                    continue
                record = self._convert(study, series)
                if record.skipped:
                    skipped.append(f"{_label(series.first)} ({record.skipped})")
                if self.mode == "only":
                    result.stored += sorted(series.uids)
        if skipped:
            written = " and not written (NIfTI only)" if self.mode == "only" else ""
            result.notes.append(f"{len(skipped)} series not converted to NIfTI{written}: "
                                + "; ".join(skipped))
        if grew:
            which = ", ".join(grew)
            if not isinstance(self.inner, FolderSink):
                raise SeriesGrewInArchive(f"series {which} grew while the archive was written:"
                                          " run the job again")
            raise SeriesGrew(f"series {which} grew since it was converted to NIfTI: it is "
                             "retrieved again whole")
        return result

    def add_file(self, study: StudyTarget, relative: Path, data: bytes, *,
                 series_uid: str = "", kind: str = "file") -> Path:
        return self.inner.add_file(study, relative, data, series_uid=series_uid, kind=kind)

    def records(self, study: StudyTarget) -> dict[str, SeriesRecord]:
        """The series records of a study: those of this run, and those a folder holds."""
        found: dict[str, SeriesRecord] = {}
        if isinstance(self.inner, FolderSink):
            base = self.inner.root / study.folder
            for path in sorted(base.glob("*/nifti/*.adit.json")):
                if path.is_file() and path.stat().st_size <= MAX_TEXT_BYTES:
                    record = SeriesRecord.from_json(path.read_bytes(),
                                                    path.relative_to(base).as_posix())
                    if record is not None:
                        found[record.series_uid] = record
        key = study.folder.as_posix()
        with self._lock:
            found.update({uid: r for (folder, uid), r in self._records.items() if folder == key})
        return found

    def _convert(self, study: StudyTarget, series: _Series) -> SeriesRecord:
        first = series.first
        where = Path(series_folder(first, study.pseudonymized)) / "nifti"
        stem, label = series_stem(first), _label(first)
        reason = skip_reason(first.sop_class_uid, len(series.uids), series.image_type)
        names: list[str] = []
        if not reason:
            started = time.monotonic()
            outputs = convert_series(series.folder, self.deid, label=label,
                                     timeout=self.timeout, tool=self.tool)
            for output in outputs:
                relative = where / f"{stem}{output.suffix}{output.extension}"
                self.inner.add_file(study, relative, output.data,
                                    series_uid=first.series_uid, kind=output.kind)
                names.append(relative.name)
            logger.info("series %s: %d instances converted to NIfTI (%d files) in %.1f s",
                        label, len(series.uids), len(outputs), time.monotonic() - started)
        record = SeriesRecord(first.series_uid, frozenset(series.uids), tuple(names), reason,
                              name=(where / f"{stem}.adit.json").as_posix())
        self._save(study, record)
        return record

    def _save(self, study: StudyTarget, record: SeriesRecord) -> None:
        """Keep the record for this run and write it to the destination (an archive skips a
        name it holds already: its record of this run is the one in memory)."""
        with self._lock:
            self._records[(study.folder.as_posix(), record.series_uid)] = record
        self.inner.add_file(study, Path(record.name), record.to_json(),
                            series_uid=record.series_uid)
