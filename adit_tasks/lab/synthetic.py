"""Realistic synthetic DICOM studies for tests, demos and benchmarks.

Every dataset carries identifying attributes in many places (names in several PN elements,
free-text comments mentioning the patient, nested sequences, a private block, dates, UIDs)
so that pseudonymization can be checked against them. Everything is deterministic: UIDs are
derived from the :class:`StudySpec` via :func:`uid_for`, pixel noise from ``seed``.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

logger = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_CLASS_UID = UID_ROOT + "1"
IMPLEMENTATION_VERSION_NAME = "ADIT_SYNTH_1"
PRIVATE_CREATOR = "ADIT TEST"
PRIVATE_GROUP = 0x0009

REFERRING = "Schäfer^Jürgen^^Dr. med."
READING = "Weiß^Ingrid^^Prof."
PERFORMING = "Öztürk^Selin"
OPERATORS = ("Krüger^Lena", "Nowak^Piotr")
INSTITUTION = "Universitätsklinikum Heidelberg"
_FIXED_NAMES = "".join((REFERRING, READING, PERFORMING, *OPERATORS, INSTITUTION))

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
# Detached Study Management SOP Class, the usual class in ReferencedStudySequence.
STUDY_REF_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"


@dataclass(frozen=True)
class SeriesSpec:
    """One series to generate."""

    modality: str  # "CT" or "MR"
    description: str
    number: int
    instances: int
    rows: int = 512
    columns: int = 512


@dataclass(frozen=True)
class StudySpec:
    """One study to generate (patient and study level attributes plus its series)."""

    patient_id: str
    patient_name: str  # DICOM PN, e.g. "Müller^Anna Maria^^Dr."
    birth_date: str  # YYYYMMDD
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession: str
    study_description: str
    series: tuple[SeriesSpec, ...]

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID derived from patient ID and accession number."""
        return uid_for("study", self.patient_id, self.accession)

    def series_uid(self, series: SeriesSpec) -> str:
        """SeriesInstanceUID of one of this study's series."""
        return uid_for(self.study_uid, "series", str(series.number))

    @property
    def instance_count(self) -> int:
        """Total number of instances in the study."""
        return sum(s.instances for s in self.series)


def uid_for(*parts: str) -> str:
    """Deterministic, valid UID (<= 64 chars, no leading zeros) under :data:`UID_ROOT`."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    digits = str(int(digest, 16))  # never starts with "0"
    return UID_ROOT + digits[: 64 - len(UID_ROOT)]


def _charset(*texts: str) -> str | None:
    """SpecificCharacterSet needed for ``texts`` (None for plain ASCII)."""
    joined = "".join(texts)
    if joined.isascii():
        return None
    try:
        joined.encode("latin-1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def _readable_name(pn: str) -> str:
    """'Müller^Anna Maria^^Dr.' -> 'Dr. Anna Maria Müller'."""
    comps = ([*pn.split("^"), "", "", "", ""])[:5]
    family, given, middle, prefix, suffix = comps
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


def _age(birth: str, on: str) -> str:
    """DICOM AS value (e.g. '054Y') for a birth date at a study date."""
    b = datetime.strptime(birth, "%Y%m%d").date()
    d = datetime.strptime(on, "%Y%m%d").date()
    years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
    return f"{max(years, 0):03d}Y"


def _add_seconds(hhmmss: str, seconds: int) -> str:
    t = datetime.strptime(hhmmss[:6], "%H%M%S") + timedelta(seconds=seconds)
    return t.strftime("%H%M%S")


def _sex_of(spec: StudySpec) -> str:
    return "F" if int(hashlib.md5(spec.patient_id.encode()).hexdigest(), 16) % 2 else "M"


class _PixelSource:
    """Cheap, per-slice different 12-bit images: a body-like ellipse + gradient + noise."""

    def __init__(self, rows: int, columns: int, modality: str, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
        cy, cx = (rows - 1) / 2, (columns - 1) / 2
        self.r2 = ((y - cy) / (0.42 * rows)) ** 2 + ((x - cx) / (0.47 * columns)) ** 2
        gradient = (x / max(columns - 1, 1)) * 120 + (y / max(rows - 1, 1)) * 60
        if modality == "CT":  # stored values = HU + 1024; air ~ 24, tissue ~ 1060
            self.inside = (1060 + gradient).astype(np.int32)
            self.outside = 24
        else:
            self.inside = (600 + 3 * gradient).astype(np.int32)
            self.outside = 5
        self.modality = modality

    def slice(self, index: int, count: int) -> bytes:
        """Pixel bytes (uint16 LE) of slice ``index`` of ``count``."""
        frac = index / max(count - 1, 1)
        # body ellipse grows then shrinks along the series; a "spine" blob moves a bit
        scale = 0.75 + 0.25 * np.sin(np.pi * frac)
        body = self.r2 <= scale * scale
        img = np.where(body, self.inside, self.outside)
        img = img + (self.rng.integers(0, 48, size=img.shape, dtype=np.int32))
        img += (self.r2 < 0.02 + 0.01 * frac).astype(np.int32) * 700  # bright core
        np.clip(img, 0, 4095, out=img)
        return img.astype("<u2").tobytes()


def _patient_and_study(ds: Dataset, spec: StudySpec, charset: str | None) -> None:
    """Patient, general study and request attributes."""
    readable = _readable_name(spec.patient_name)
    family, given = ([*spec.patient_name.split("^"), ""])[:2]
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.IssuerOfPatientID = "ADIT-HOSP"
    ds.PatientBirthDate = spec.birth_date
    ds.PatientSex = _sex_of(spec)
    ds.PatientAge = _age(spec.birth_date, spec.study_date)
    ds.PatientSize = "1.74"
    ds.PatientWeight = "72"
    ds.OtherPatientIDs = [f"{spec.patient_id}-ALT", f"KV{spec.patient_id[-6:]:0>6}"]
    ds.OtherPatientNames = f"{family}-Alt^{given}"
    ds.PatientComments = f"Patient {readable} consented to research use."
    ds.AdditionalPatientHistory = f"{readable}, follow-up exam"

    ds.StudyInstanceUID = spec.study_uid
    ds.StudyDate = spec.study_date
    ds.StudyTime = spec.study_time
    ds.AccessionNumber = spec.accession
    ds.StudyID = spec.accession[-8:]
    ds.StudyDescription = spec.study_description
    ds.ReferringPhysicianName = REFERRING
    ds.NameOfPhysiciansReadingStudy = READING
    ds.InstitutionName = INSTITUTION
    ds.InstitutionAddress = "Im Neuenheimer Feld 672, 69120 Heidelberg"
    ds.InstitutionalDepartmentName = "Radiologie"

    ref = Dataset()
    ref.ReferencedSOPClassUID = STUDY_REF_SOP_CLASS
    ref.ReferencedSOPInstanceUID = uid_for(spec.study_uid, "prior")
    ds.ReferencedStudySequence = [ref]

    req = Dataset()
    req.RequestedProcedureID = f"RP{spec.accession[-8:]}"
    req.ScheduledProcedureStepID = f"SPS{spec.accession[-8:]}"
    req.RequestedProcedureDescription = spec.study_description
    req.ScheduledProcedureStepDescription = f"{spec.study_description} for {readable}"
    req.AccessionNumber = spec.accession
    req.StudyInstanceUID = spec.study_uid
    req.RequestingPhysician = REFERRING
    ds.RequestAttributesSequence = [req]


def _series_and_image(
    ds: Dataset, spec: StudySpec, series: SeriesSpec, index: int, series_time: str
) -> None:
    """Series, equipment, frame of reference and image attributes of one instance."""
    readable = _readable_name(spec.patient_name)
    ct = series.modality == "CT"
    ds.Modality = series.modality
    ds.SeriesInstanceUID = spec.series_uid(series)
    ds.SeriesNumber = series.number
    ds.SeriesDescription = series.description
    ds.SeriesDate = spec.study_date
    ds.SeriesTime = series_time
    ds.PerformingPhysicianName = PERFORMING
    ds.OperatorsName = list(OPERATORS)
    ds.ProtocolName = series.description
    ds.BodyPartExamined = "CHEST" if ct else "HEAD"
    ds.PatientPosition = "HFS"
    ds.Manufacturer = "ADIT Synthetic Imaging"
    ds.ManufacturerModelName = "SynthoScan 3000" if ct else "SynthoMag 1.5T"
    ds.StationName = f"{series.modality}HD{sum(map(ord, spec.patient_id)) % 9 + 1:02d}"
    ds.DeviceSerialNumber = f"SN-{series.modality}-{uid_for(spec.patient_id)[-6:]}"
    ds.SoftwareVersions = "1.0.0"
    ds.FrameOfReferenceUID = uid_for(spec.study_uid, "frame", str(series.number))
    ds.PositionReferenceIndicator = ""

    ds.SOPClassUID = SOP_CLASS[series.modality]
    ds.SOPInstanceUID = uid_for(ds.SeriesInstanceUID, "instance", str(index + 1))
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    acq_time = _add_seconds(series_time, index // 8)
    ds.AcquisitionDate = spec.study_date
    ds.AcquisitionTime = acq_time
    ds.ContentDate = spec.study_date
    ds.ContentTime = acq_time
    ds.AcquisitionNumber = 1
    ds.ImageComments = f"Synthetic image of {readable}, slice {index + 1}"

    thickness = 1.0 if ct else 5.0
    ds.SliceThickness = f"{thickness:g}"
    ds.ImagePositionPatient = [-175.0, -175.0, round(-index * thickness, 2)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceLocation = round(-index * thickness, 2)
    ds.PixelSpacing = [round(350.0 / series.rows, 4), round(350.0 / series.columns, 4)]
    if ct:
        ds.KVP = "120"
        ds.XRayTubeCurrent = 250
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "B30f"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = "500"
        ds.EchoTime = "15"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.87"
        ds.WindowCenter = "600"
        ds.WindowWidth = "1200"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = series.rows
    ds.Columns = series.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0


def _private_block(ds: Dataset, spec: StudySpec) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", spec.patient_name)
    block.add_new(0x02, "LO", spec.patient_id)
    block.add_new(0x03, "DA", spec.birth_date)


def make_study(spec: StudySpec, seed: int = 0) -> Iterator[Dataset]:
    """Yield complete datasets (with file_meta, Explicit VR Little Endian) for ``spec``."""
    # the fixed physician/institution names contain umlauts, so this is at least ISO_IR 100
    charset = _charset(spec.patient_name, spec.study_description, _FIXED_NAMES,
                       *(s.description for s in spec.series))
    for s_idx, series in enumerate(spec.series):
        pixels = _PixelSource(series.rows, series.columns, series.modality,
                              seed=_seed_for(seed, spec.study_uid, series.number))
        series_time = _add_seconds(spec.study_time, 120 * (s_idx + 1))
        for index in range(series.instances):
            ds = Dataset()
            _patient_and_study(ds, spec, charset)
            _series_and_image(ds, spec, series, index, series_time)
            _private_block(ds, spec)
            ds.PixelData = pixels.slice(index, series.instances)
            ds["PixelData"].VR = "OW"

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            meta.SourceApplicationEntityTitle = "ADIT_SYNTH"
            ds.file_meta = meta
            yield ds


def _seed_for(seed: int, *parts: object) -> int:
    """Stable numpy seed from ``seed`` and identifying parts (not Python's salted hash)."""
    text = "\x1f".join(map(str, (seed, *parts)))
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def write_study(spec: StudySpec, folder: Path, seed: int = 0) -> list[Path]:
    """Write one file per instance into ``folder`` (named ``<SOPInstanceUID>.dcm``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in make_study(spec, seed=seed):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d instances of study %s to %s", len(paths), spec.study_uid, folder)
    return paths


_FAMILY = ["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
           "Schulz", "Hoffmann", "Schäfer", "Koch", "Bauer", "Richter", "Klein", "Wolf",
           "Schröder", "Neumann", "Schwarz", "Zimmermann", "Braun", "Krüger", "Hofmann", "Groß"]
_GIVEN_F = ["Anna Maria", "Sophie", "Marie", "Lena", "Hannah", "Charlotte Louise",
            "Emilia", "Zoë", "Ingrid", "Käthe", "Greta"]
_GIVEN_M = ["Jürgen", "Lukas", "Maximilian", "Felix", "Jonas Peter", "Björn", "Paul", "Elias",
            "Lars", "Sören", "Hans-Jörg", "Till"]
_PREFIX = ["", "", "", "Dr.", "Prof. Dr."]
_CT_STUDIES = [("CT Thorax mit KM", ["Thorax 1.0 B30f", "Thorax 5.0 B70f", "Topogramm"]),
               ("CT Abdomen nativ", ["Abdomen 3.0 B30f", "Abdomen 5.0 Weichteil"]),
               ("CT Schädel", ["Schädel 4.0 H30s", "Schädel Knochen 1.0"])]
_MR_STUDIES = [("MRT Kopf", ["t1_se_tra", "t2_tse_tra", "flair_tra"]),
               ("MRT Knie rechts", ["pd_tse_fs_cor", "t1_tse_sag"]),
               ("MRT LWS", ["t2_tse_sag", "t1_tse_sag", "t2_tse_tra"])]


def demo_specs(n_patients: int = 3, seed: int = 0) -> list[StudySpec]:
    """A small realistic data set: ``n_patients`` patients with 1-3 CT/MR studies of 64x64."""
    rng = random.Random(seed)
    specs: list[StudySpec] = []
    for p in range(n_patients):
        female = rng.random() < 0.5
        given = rng.choice(_GIVEN_F if female else _GIVEN_M)
        name = f"{rng.choice(_FAMILY)}^{given}^^{rng.choice(_PREFIX)}".rstrip("^")
        patient_id = f"PAT{seed % 1000:03d}{p + 1:04d}"
        birth = date(1940, 1, 1) + timedelta(days=rng.randrange(0, 365 * 60))
        for s in range(rng.randint(1, 3)):
            modality = rng.choice(["CT", "MR"])
            desc, series_names = rng.choice(_CT_STUDIES if modality == "CT" else _MR_STUDIES)
            study_day = date(2018, 1, 1) + timedelta(days=rng.randrange(0, 365 * 6))
            n_series = rng.randint(1, len(series_names))
            series = tuple(
                SeriesSpec(modality=modality, description=series_names[i], number=i + 1,
                           instances=rng.randint(3, 8), rows=64, columns=64)
                for i in range(n_series)
            )
            specs.append(StudySpec(
                patient_id=patient_id,
                patient_name=name,
                birth_date=birth.strftime("%Y%m%d"),
                study_date=study_day.strftime("%Y%m%d"),
                study_time=f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}00",
                accession=f"ACC{seed % 1000:03d}{p + 1:03d}{s + 1:02d}",
                study_description=desc,
                series=series,
            ))
    return specs


def ct_study_spec(instances: int = 150, seed: int = 0) -> StudySpec:
    """One CT study with one series of ``instances`` 512x512 16-bit slices (~0.5 MB each)."""
    return StudySpec(
        patient_id=f"CTBENCH{seed:04d}",
        patient_name="Größmann^Jörg Günther^^Dr.",
        birth_date="19621107",
        study_date="20240315",
        study_time="101530",
        accession=f"ACCCT{seed:06d}",
        study_description="CT Thorax Abdomen mit KM",
        series=(SeriesSpec(modality="CT", description="Thorax-Abdomen 1.0 B30f", number=1,
                           instances=instances),),
    )
