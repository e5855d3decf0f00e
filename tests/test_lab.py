"""Quick checks of the lab helpers: synthetic DICOM files and real local PACS servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from adit_tasks.lab.servers import DcmqrscpServer, OrthancServer
from adit_tasks.lab.synthetic import (
    PRIVATE_CREATOR,
    StudySpec,
    ct_study_spec,
    demo_specs,
    make_study,
    uid_for,
    write_study,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[StudySpec], list[Path]]:
    """Two small demo patients written to disk."""
    folder = tmp_path_factory.mktemp("synthetic")
    specs = demo_specs(n_patients=2, seed=1)
    paths = [p for spec in specs for p in write_study(spec, folder, seed=1)]
    return specs, paths


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, study) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), dicomweb=True)
    try:
        server.start()
        server.upload(study[1])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dcmqrscp(tmp_path_factory: pytest.TempPathFactory, study) -> Iterator[DcmqrscpServer]:
    server = DcmqrscpServer(tmp_path_factory.mktemp("dcmqrscp"))
    try:
        server.load(study[1][:3])  # before start ...
        server.start()
        server.load(study[1][3:])  # ... and while running
        yield server
    finally:
        server.stop()


def test_uid_for_is_valid_and_deterministic() -> None:
    for parts in [("a",), ("study", "PAT1", "ACC1"), ("x" * 500,), ("",)]:
        uid = uid_for(*parts)
        assert UID(uid).is_valid and len(uid) <= 64
        assert uid == uid_for(*parts)
    assert uid_for("a", "b") != uid_for("ab")


def test_files_are_valid_and_identifying(study) -> None:
    specs, paths = study
    assert len(paths) == sum(s.instance_count for s in specs)
    study_uids = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "FrameOfReferenceUID", "SOPClassUID"):
            assert UID(ds[keyword].value).is_valid, keyword
        assert UID(ds.file_meta.ImplementationClassUID).is_valid
        assert ds.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
        assert ds.Modality in ("CT", "MR") and ds.Rows == ds.Columns == 64
        assert ds.PatientName.family_name and ds.PatientName.given_name
        assert ds.PatientName.given_name.split()[0] in ds.ImageComments
        assert ds.RequestAttributesSequence[0].RequestedProcedureID
        assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID
        block = ds.private_block(0x0009, PRIVATE_CREATOR)
        assert block[0x01].value == str(ds.PatientName)
        assert ds.pixel_array.std() > 0
        study_uids.add(ds.StudyInstanceUID)
    assert study_uids == {s.study_uid for s in specs}


def test_generation_is_deterministic() -> None:
    spec = demo_specs(1, seed=3)[0]
    first = list(make_study(spec, seed=7))
    again = list(make_study(spec, seed=7))
    other = list(make_study(spec, seed=8))
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]
    assert first[0].PixelData == again[0].PixelData != other[0].PixelData
    assert first[0].PixelData != first[1].PixelData  # slices differ


def test_ct_study_spec_shape() -> None:
    spec = ct_study_spec(instances=2)
    datasets = list(make_study(spec))
    assert len(datasets) == 2
    ds = datasets[0]
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.Modality) == (512, 512, 12, "CT")
    assert len(ds.PixelData) == 512 * 512 * 2
    assert ds.SpecificCharacterSet == "ISO_IR 100"  # umlauts in the patient name


def _echo_and_find(host: str, port: int, ae_title: str) -> list[Dataset]:
    ae = AE("LABTEST")
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(host, port, ae_title=ae_title)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.PatientName = ""
        query.PatientID = ""
        results = []
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            assert status.Status in (0x0000, 0xFF00, 0xFF01)
            if ident is not None:
                results.append(ident)
        return results
    finally:
        assoc.release()


def test_orthanc_echo_find_and_count(orthanc: OrthancServer, study) -> None:
    specs, paths = study
    assert orthanc.instance_count() == len(paths)
    found = _echo_and_find(orthanc.host, orthanc.dicom_port, orthanc.ae_title)
    assert {d.StudyInstanceUID for d in found} == {s.study_uid for s in specs}
    names = {str(d.PatientName) for d in found}
    assert names == {s.patient_name for s in specs}
    resp = orthanc.client.get(orthanc.dicomweb_url + "/studies")
    assert resp.status_code == 200
    assert len(resp.json()) == len(specs)


def test_dcmqrscp_echo_and_find(dcmqrscp: DcmqrscpServer, study) -> None:
    specs, _ = study
    found = _echo_and_find(dcmqrscp.host, dcmqrscp.port, dcmqrscp.ae_title)
    assert {d.StudyInstanceUID for d in found} == {s.study_uid for s in specs}
    assert {str(d.PatientName) for d in found} == {s.patient_name for s in specs}
    # a second association works too (the server keeps running)
    assert len(_echo_and_find(dcmqrscp.host, dcmqrscp.port, dcmqrscp.ae_title)) == len(specs)
