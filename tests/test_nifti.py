"""NIfTI output (adit_tasks/core/nifti.py) with the real dcm2niix.

The source is an in-process C-GET SCP (tests/scp.py) holding a generated study of a marker
patient: a CT series (8 slices) and an MR series (10 slices) of 64x64, a secondary capture
and a text SR. The destination is a real folder or archive, through the plan that
`transfer_plan` builds for `--nifti`. NIfTI headers are read here with gzip + struct
(NIfTI-1: dim at byte 40, datatype at 70, pixdim at 76, vox_offset at 108), independently of
the product's reader. Hostile converters (scripts standing in for dcm2niix) check that its
output is checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import py7zr
import pytest
import typer
from pydicom import Dataset
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from typer.testing import CliRunner

from adit_tasks.core.association import local_slot
from adit_tasks.core.config import FolderNode, ReceiverAddress, RetryPolicy, ServerNode
from adit_tasks.core.deid_rules import PseudonymizationOptions
from adit_tasks.core.errors import ConfigError, is_retriable
from adit_tasks.core.find import Study
from adit_tasks.core.nifti import (
    ConversionFailed,
    ConversionInterrupted,
    NiftiSink,
    SeriesGrew,
    clean_sidecar,
    convert_series,
)
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.plan import TransferPlan, transfer_plan
from adit_tasks.core.results import StudyJob
from adit_tasks.core.sinks import FolderSink
from adit_tasks.core.transfer import transfer_study
from adit_tasks.lab.servers import free_port
from adit_tasks.lab.synthetic import INSTITUTION, SeriesSpec, StudySpec, make_study
from deployments.model_options import model_options
from tests.dicom_builders import marker_leaks
from tests.scp import LOOPBACK, MisbehavingSCP

SECRET = "nifti-test-secret"
PASSWORD = "nifti-archive-pw"
MARKER_NAME = "Leckmann-Quast^Ottilie Hedwig^^Dr."
BIRTH = "19510203"
CLASSES = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, BasicTextSRStorage)


def _study(tag: str, ct_slices: int = 8) -> tuple[StudySpec, list[Dataset]]:
    """The marker patient's study: CT, MR, a secondary capture (3) and a text SR (4); names
    in the descriptions, comments and everywhere else make_study puts them."""
    spec = StudySpec(f"NIFLEAK{tag}", MARKER_NAME, BIRTH, "20240101", "120000",
                     f"ACCNIF{tag}", "Thorax Leckmann-Quast",
                     (SeriesSpec("CT", "Thorax Leckmann-Quast", 1, ct_slices, 64, 64),
                      SeriesSpec("MR", "t1 Ottilie", 2, 10, 64, 64),
                      SeriesSpec("CT", "screenshot", 3, 1, 16, 16),
                      SeriesSpec("CT", "report", 4, 1, 16, 16)))
    datasets = list(make_study(spec))
    for ds in datasets:
        if ds.SeriesNumber == 3:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.Modality = "OT"
        elif ds.SeriesNumber == 4:
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
            ds.Modality = "SR"
            del ds.PixelData
    return spec, datasets


@contextlib.contextmanager
def _plan(scp: MisbehavingSCP, root: Path, spec: StudySpec,
          **options: Any) -> Iterator[TransferPlan]:
    node = ServerNode(name="pacs", ae_title=scp.ae_title, host=LOOPBACK, port=scp.port,
                      timeout=10)
    with transfer_plan(node, FolderNode(name="downloads", path=root), TransferOptions(**options),
                       [StudyJob(spec.study_uid)], calling_ae="ADIT",
                       receiver=ReceiverAddress("ADIT", LOOPBACK, free_port()),
                       retry=RetryPolicy(0, 0.0), method="c-get", pseudonym_secret=SECRET,
                       archive_password=PASSWORD, slot=local_slot) as plan:
        yield plan


@dataclasses.dataclass
class Volume:
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    header: bytes  # up to vox_offset: header and extensions
    voxels: np.ndarray


def read_nifti(data: bytes) -> Volume:
    raw = gzip.decompress(data)
    assert struct.unpack_from("<i", raw, 0)[0] == 348 and raw[344:348] == b"n+1\0"
    ndim = struct.unpack_from("<h", raw, 40)[0]
    datatype = struct.unpack_from("<h", raw, 70)[0]
    offset = int(struct.unpack_from("<f", raw, 108)[0])
    dtype = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 512: "<u2"}[datatype]
    return Volume(struct.unpack_from(f"<{ndim}h", raw, 42),
                  struct.unpack_from(f"<{ndim}f", raw, 80), raw[:offset],
                  np.frombuffer(raw, dtype, offset=offset))


def _pixel_sum(datasets: list[Dataset], number: int) -> int:
    return sum(int(np.frombuffer(ds.PixelData, "<u2").sum())
               for ds in datasets if ds.SeriesNumber == number)


def _files(root: Path, pattern: str) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob(pattern) if p.is_file()}


# --- volumes -------------------------------------------------------------------------------


def test_ct_and_mr_series_become_volumes_of_their_geometry_beside_the_dicom_files(tmp_path):
    spec, datasets = _study("V1")
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets, storage_classes=CLASSES) as scp:
        with _plan(scp, root, spec) as plan:  # first without NIfTI
            assert not isinstance(plan.sink, NiftiSink)
            transfer_study(plan, StudyJob(spec.study_uid))
        with _plan(scp, root, spec, nifti="also") as plan:
            assert isinstance(plan.sink, NiftiSink)
            outcome = transfer_study(plan, StudyJob(spec.study_uid))
            written = {p: f.read_bytes() for p, f in _files(root, "*").items()}
            again = transfer_study(plan, StudyJob(spec.study_uid))
    # Asked for NIfTI now: every series is sent again, to be converted whole.
    assert outcome.transferred == len(datasets) == 20
    assert again.message == "already complete at the destination"
    assert {p: f.read_bytes() for p, f in _files(root, "*").items()} == written
    assert len(_files(root, "*.dcm")) == 20  # `also`: every DICOM file as before
    # The SC and the SR are skipped with their reasons: a warning, not a failure.
    assert outcome.status == "warning"
    assert outcome.message == (
        "2 series not converted to NIfTI: 3-OT (Secondary Capture Image Storage is not an "
        "image volume); 4-SR (Basic Text SR Storage is not an image volume)")
    volumes = _files(root, "*.nii.gz")
    assert sorted(Path(p).parent.as_posix().split("/", 2)[2] for p in volumes) == [
        "1-Thorax_Leckmann-Quast/nifti", "2-t1_Ottilie/nifti"]
    by_series = {Path(p).name.split("-")[0]: read_nifti(f.read_bytes())
                 for p, f in volumes.items()}
    ct, mr = by_series["1"], by_series["2"]
    # PixelSpacing 350/64 mm, SliceThickness and slice positions 1 mm (CT), 5 mm (MR).
    assert ct.shape == (64, 64, 8) and mr.shape == (64, 64, 10)
    assert ct.spacing == pytest.approx((5.4688, 5.4688, 1.0), abs=1e-3)
    assert mr.spacing == pytest.approx((5.4688, 5.4688, 5.0), abs=1e-3)
    # Every stored pixel value arrived (in whatever order dcm2niix puts them).
    assert int(ct.voxels.astype(np.int64).sum()) == _pixel_sum(datasets, 1)
    assert int(mr.voxels.astype(np.int64).sum()) == _pixel_sum(datasets, 2)
    sidecars = _files(root, "nifti/*-*-????????.json")
    assert len(sidecars) == 2
    assert {json.loads(p.read_text())["Modality"] for p in sidecars.values()} == {"CT", "MR"}


def test_pseudonymized_nifti_only_leaks_nothing_and_a_rerun_converts_nothing(tmp_path,
                                                                             caplog):
    caplog.set_level(logging.DEBUG)
    spec, datasets = _study("P1")
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets, storage_classes=CLASSES) as scp, \
            _plan(scp, root, spec, nifti="only", pseudonymize=True) as plan:
        outcome = transfer_study(plan, StudyJob(spec.study_uid))
        everything = {p: f.read_bytes() for p, f in _files(root, "*").items()}
        again = transfer_study(plan, StudyJob(spec.study_uid))
    assert outcome.status == "warning"
    assert "2 series not converted to NIfTI and not written (NIfTI only)" in outcome.message
    assert not _files(root, "*.dcm")  # `only`: no DICOM file in the destination
    volumes = {p: read_nifti(d) for p, d in everything.items() if p.endswith(".nii.gz")}
    assert sorted(v.shape for v in volumes.values()) == [(64, 64, 8), (64, 64, 10)]
    for volume in volumes.values():  # descrip (dcm2niix: the time), aux_file (ImageComments)
        assert volume.header[148:252] == bytes(104)
    # A re-run finds every series recorded: nothing retrieved, converted or rewritten.
    assert (again.status, again.transferred, again.skipped) == ("success", 0, 20)
    assert {p: f.read_bytes() for p, f in _files(root, "*").items()} == everything

    markers = _markers(spec, datasets)
    # ADIT's own log (pynetdicom's debug log prints the test SCP's identifiers)
    said = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("adit"))
    assert "series 1-CT: 8 instances converted to NIfTI (2 files)" in said
    assert not marker_leaks(said.encode(), markers)
    for path, data in everything.items():
        assert not marker_leaks(path.encode(), markers), path
        text = volumes[path].header if path in volumes else data  # the voxels are numbers
        assert not marker_leaks(text, markers), path
    sidecars = [json.loads(d) for p, d in everything.items()
                if p.endswith(".json") and not p.endswith(".adit.json")]
    assert len(sidecars) == 2
    for sidecar in sidecars:
        assert not {"InstitutionName", "ImageComments", "StationName", "DeviceSerialNumber",
                    "AcquisitionTime", "SoftwareVersions"} & set(sidecar)
        assert sidecar["Modality"] in ("CT", "MR") and "SliceThickness" in sidecar

    # The search finds what it looks for: dcm2niix's output of the original DICOM carries the
    # institution (sidecar) and the patient's name (aux_file, from ImageComments).
    spool = tmp_path / "spool"
    spool.mkdir()
    for i, ds in enumerate(d for d in datasets if d.SeriesNumber == 1):
        ds.save_as(spool / f"{i}.dcm", enforce_file_format=True)
    raw = convert_series(spool, None, label="1-CT")
    leaked = [m for f in raw for m in marker_leaks(
        read_nifti(f.data).header if f.kind == "nifti" else f.data, markers)]
    assert INSTITUTION in leaked and "Ottilie" in leaked


def _markers(spec: StudySpec, datasets: list[Dataset]) -> list[str]:
    """The marker patient: name parts, ID, birth and study dates, accession, original UIDs,
    institution and device identity."""
    family, given = spec.patient_name.split("^")[:2]
    first = datasets[0]
    return [spec.patient_name, *family.split("-"), *given.split(), spec.patient_id, BIRTH,
            "1951-02-03", spec.accession, spec.study_date, spec.study_uid, INSTITUTION,
            "Heidelberg", str(first.StationName), str(first.DeviceSerialNumber),
            *{str(ds.SeriesInstanceUID) for ds in datasets},
            *(str(ds.SOPInstanceUID) for ds in datasets)]


# --- re-runs -------------------------------------------------------------------------------


def test_a_series_that_grew_is_converted_again_whole_not_twice(tmp_path):
    spec, datasets = _study("G1", ct_slices=8)
    first_six = [ds for ds in datasets if ds.SeriesNumber != 1 or ds.InstanceNumber <= 6]
    root = tmp_path / "dest"
    with MisbehavingSCP(first_six, storage_classes=CLASSES) as scp:
        with _plan(scp, root, spec, nifti="only", pseudonymize=True) as plan:
            transfer_study(plan, StudyJob(spec.study_uid))
        ct = [p for p in _files(root, "*.nii.gz") if "/1-CT/" in p]
        assert len(ct) == 1 and read_nifti((root / ct[0]).read_bytes()).shape == (64, 64, 6)
        scp.datasets = datasets  # two more slices arrive at the PACS
        with _plan(scp, root, spec, nifti="only", pseudonymize=True) as plan:
            with pytest.raises(SeriesGrew) as grew:
                transfer_study(plan, StudyJob(spec.study_uid))
            assert is_retriable(grew.value)  # the task's retry does the rest
            assert str(grew.value) == ("series 1-CT grew since it was converted to NIfTI: "
                                       "it is retrieved again whole")
        # The retry (here: the next run) retrieves the series whole and converts it again.
        with _plan(scp, root, spec, nifti="only", pseudonymize=True) as plan:
            outcome = transfer_study(plan, StudyJob(spec.study_uid))
            assert outcome.transferred == 8  # the CT series, whole
            again = transfer_study(plan, StudyJob(spec.study_uid))
    assert again.transferred == 0 and again.message == "already complete at the destination"
    ct = [p for p in _files(root, "*") if "/1-CT/" in p]
    assert len(ct) == 3  # the volume, its sidecar and its record, under the same names
    volume = next(p for p in ct if p.endswith(".nii.gz"))
    assert read_nifti((root / volume).read_bytes()).shape == (64, 64, 8)
    assert not _files(root, "*.dcm")


# --- archives and plans ----------------------------------------------------------------------


def test_an_archive_destination_holds_the_nifti_files(tmp_path):
    spec, datasets = _study("A1")
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets, storage_classes=CLASSES) as scp, \
            _plan(scp, root, spec, nifti="also", archive=True, trial_id="NIFTI") as plan:
        outcome = transfer_study(plan, StudyJob(spec.study_uid))
        assert plan.archive is not None
        path = plan.archive.finish()
    assert outcome.transferred == 20
    with py7zr.SevenZipFile(path, "r", password=PASSWORD) as archive:
        archive.extractall(tmp_path / "x")
    files = {name: f.read_bytes() for name, f in _files(tmp_path / "x", "*").items()}
    assert len([n for n in files if n.endswith(".dcm")]) == 20
    volumes = sorted(read_nifti(d).shape for n, d in files.items() if n.endswith(".nii.gz"))
    assert volumes == [(64, 64, 8), (64, 64, 10)]
    assert len([n for n in files if n.endswith(".json") and not n.endswith(".adit.json")]) == 2
    assert len([n for n in files if n.endswith(".adit.json")]) == 4  # one per series


def test_nifti_to_a_dicom_server_is_a_config_error(tmp_path):
    node = ServerNode(name="pacs", ae_title="PACS", host=LOOPBACK, port=free_port())
    with pytest.raises(ConfigError, match="NIfTI output is written to folder nodes"), \
            transfer_plan(node, node, TransferOptions(nifti="only"), [], calling_ae="ADIT",
                          receiver=ReceiverAddress("ADIT", LOOPBACK, free_port()),
                          retry=RetryPolicy(0, 0.0), method="c-get", slot=local_slot):
        pass


def test_the_option_is_a_choice_on_the_command_line_and_in_the_picker_form():
    got: dict[str, Any] = {}
    probe = typer.Typer()

    @probe.command()
    @model_options("options", TransferOptions)
    def run(name: Annotated[str, typer.Argument()], options: TransferOptions) -> None:
        got["options"] = options

    runner = CliRunner()
    assert runner.invoke(probe, ["x", "--nifti", "only"]).exit_code == 0
    assert got["options"].nifti == "only"
    assert runner.invoke(probe, ["x", "--nifti", "sometimes"]).exit_code == 2
    assert got["options"].nifti == "only"  # the command did not run again
    from flows.selective_transfer import selection_form

    study = Study(PatientID="", PatientName="", PatientBirthDate="", StudyDate="",
                  StudyTime="", ModalitiesInStudy="CT", StudyDescription="", AccessionNumber="",
                  NumberOfStudyRelatedInstances=1, StudyInstanceUID="1.2.3")
    form = selection_form([study], ["downloads"], "downloads").model_json_schema()
    assert form["properties"]["nifti"]["enum"] == ["no", "only", "also"]


# --- what dcm2niix writes is checked -------------------------------------------------------


def _tool(tmp_path: Path, body: str) -> str:
    """A stand-in for dcm2niix: a shell script; `$OUT` is the folder given by -o."""
    script = tmp_path / "fake-dcm2niix"
    script.write_text("#!/bin/sh\nwhile [ $# -gt 1 ]; do [ \"$1\" = -o ] && OUT=$2; shift; "
                      "done\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def _nii(shape: tuple[int, ...] = (2, 2, 2), extra: int = 0) -> str:
    """printf arguments of a minimal NIfTI-1 file of uint8 voxels, `extra` bytes too long."""
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into(f"<{1 + len(shape)}h", header, 40, len(shape), *shape)
    struct.pack_into("<hh", header, 70, 2, 8)
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    data = bytes(header) + bytes(int(np.prod(shape)) + extra)
    return "".join(f"\\{b:03o}" for b in data)


@pytest.mark.parametrize("body,error,message", [
    ("exit 1", ConversionFailed, "dcm2niix failed (exit 1)"),
    ("kill -9 $$", ConversionInterrupted, "dcm2niix stopped (exit -9)"),
    ("exec sleep 5", ConversionInterrupted, "did not finish within 0.5 s"),
    ("exit 0", ConversionFailed, "made no volume of it"),
    ("printf '{nii}' > $OUT/series.nii; echo x > $OUT/Leckmann.nii", ConversionFailed,
     "unexpected file"),
    ("printf '{nii}' > $OUT/series.nii; ln -s /etc/passwd $OUT/series.json",
     ConversionFailed, "unexpected file"),
    ("printf '{long}' > $OUT/series.nii", ConversionFailed, "size does not match its header"),
    ("printf '{nii}' > $OUT/series.nii; echo '[1' > $OUT/series.json", ConversionFailed,
     "sidecar that is not JSON"),
    ("printf '{nii}' > $OUT/series.nii; echo 'Leckmann' > $OUT/series.bval",
     ConversionFailed, "not numbers"),
])
def test_a_misbehaving_converter_fails_the_series(tmp_path, body, error, message):
    tool = _tool(tmp_path, body.replace("{nii}", _nii()).replace("{long}", _nii(extra=3)))
    with pytest.raises(error) as failed:
        convert_series(tmp_path, None, label="1-CT", timeout=0.5, tool=tool)
    assert str(failed.value).startswith("series 1-CT: ") and message in str(failed.value)
    assert "Leckmann" not in str(failed.value)
    assert is_retriable(failed.value) == (error is ConversionInterrupted)


def test_a_converter_failure_fails_the_study_after_the_dicom_files_are_written(tmp_path):
    spec, datasets = _study("F1")
    root = tmp_path / "dest"
    with MisbehavingSCP(datasets, storage_classes=CLASSES) as scp, \
            _plan(scp, root, spec) as plan:
        broken = NiftiSink(FolderSink(root), "also", tool=_tool(tmp_path, "exit 4"))
        with pytest.raises(ConversionFailed, match="dcm2niix failed"):
            transfer_study(dataclasses.replace(plan, sink=broken), StudyJob(spec.study_uid))
    assert len(_files(root, "*.dcm")) == 20 and not _files(root, "*.nii.gz")
    # The CT and MR have no record: the next run sends and converts them again.
    records = {Path(p).name.split("-")[1] for p in _files(root, "*.adit.json")}
    assert records <= {"OT", "SR"}


def test_the_sidecar_keeps_only_what_the_pseudonymization_options_allow():
    sidecar = json.dumps({
        "Modality": "MR", "EchoTime": 0.015, "SliceTiming": [0, 0.5], "ImageType": ["ORIGINAL"],
        "SeriesDescription": "t1", "ProtocolName": "t1", "ImageComments": "Ottilie",
        "InstitutionName": INSTITUTION, "StationName": "MRHD01", "AcquisitionTime": "10:12:10",
        "NewKeyOfAFutureVersion": "?", "ShimSetting": {"nested": 1}, "FlipAngle": "x" * 300,
    }).encode()
    basic = json.loads(clean_sidecar(sidecar, PseudonymizationOptions()))
    assert basic == {"Modality": "MR", "EchoTime": 0.015, "SliceTiming": [0, 0.5],
                     "ImageType": ["ORIGINAL"], "SeriesDescription": "t1", "ProtocolName": "t1"}
    kept = json.loads(clean_sidecar(sidecar, PseudonymizationOptions(
        dates="keep", retain_device_identity=True, clean_descriptors=False)))
    assert set(kept) == {"Modality", "EchoTime", "SliceTiming", "ImageType", "StationName",
                         "AcquisitionTime"}
    # Not pseudonymizing: dcm2niix's sidecar as it is (the DICOM files hold it all anyway).
    assert json.loads(clean_sidecar(sidecar, None)) == json.loads(sidecar)
