"""Data arrive in the transfer syntax the PACS stores them in, byte for byte, or not at all.

Guarantee: a retrieval (C-GET, C-MOVE, WADO-RS) and a C-STORE onwards deliver every instance
in the syntax its source stores it in, with identical pixel data, however many SOP classes and
syntaxes a study mixes (more than one association can offer); an instance the PACS converted
is never reported as delivered.

In-process SCPs (tests/scp.py) convert what they store into whatever uncompressed syntax was
negotiated, as Orthanc does; the lab's Orthanc servers hold a study of pydicom's sample files
in 12 transfer syntaxes and 6 SOP classes (6 x 39 contexts: more than 128).
"""

from __future__ import annotations

import copy
import io
import itertools

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)

from adit_tasks.core import find
from adit_tasks.core.get import get_study
from adit_tasks.core.store import store_instances
from tests.scp import MisbehavingSCP
from tests.test_misbehaving_peers import connect, study

# --- in-process peers that convert ------------------------------------------------------------


def mixed_study(tag: str, classes: list[str], syntaxes: list[str]
                ) -> tuple[str, list[Dataset]]:
    """One instance per class, cycling through `syntaxes` (uncompressed ones: the SCP can
    convert between them), in two series; each dataset's file meta says how it is stored."""
    study_uid, (template, *_) = study(tag, 1)
    series = [generate_uid(), generate_uid()]
    datasets = []
    for i, (sop_class, ts) in enumerate(zip(classes, itertools.cycle(syntaxes), strict=False)):
        ds = copy.deepcopy(template)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series[i % 2]
        ds.file_meta.TransferSyntaxUID = ts
        datasets.append(ds)
    return study_uid, datasets


def stored(datasets: list[Dataset]) -> dict[str, str]:
    return {str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID) for ds in datasets}


def test_unlisted_classes_from_a_converting_peer_arrive_as_stored() -> None:
    """The PACS lists no SOP classes (as dcmqrscp), so not every class can be offered in every
    syntax at first; what arrived on a partly offered class is fetched again."""
    classes = [CTImageStorage, SecondaryCaptureImageStorage, SecondaryCaptureImageStorage]
    study_uid, datasets = mixed_study("UNLISTED", classes, [ImplicitVRLittleEndian])
    with MisbehavingSCP(datasets, storage_classes=[CTImageStorage, SecondaryCaptureImageStorage],
                        list_sop_classes=False) as scp:
        stream = get_study(connect(scp, timeout=10), study_uid)
        got = {i.sop_instance_uid: i.transfer_syntax_uid for i in stream}
        assert not stream.rejected
        assert got == stored(datasets)
        levels = [r.QueryRetrieveLevel for r in scp.get_requests]
        assert levels[0] == "STUDY" and set(levels[1:]) == {"IMAGE"}  # SC fetched again


def test_more_classes_than_one_association_offers_arrive_as_stored() -> None:
    classes = [CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage,
               ComputedRadiographyImageStorage, UltrasoundImageStorage]
    assert len(classes) * 39 > 127  # classes x syntaxes: more than one association offers
    study_uid, datasets = mixed_study("MANYCLS", classes,
                                      [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    with MisbehavingSCP(datasets, storage_classes=classes) as scp:
        stream = get_study(connect(scp, timeout=10), study_uid, sop_classes=set(classes))
        got = [(i.sop_instance_uid, i.transfer_syntax_uid) for i in stream]
        assert not stream.rejected
        assert dict(got) == stored(datasets) and len(got) == len(datasets)  # each once
        assert scp.established == 2  # two associations, the first also lists the instances
        assert "IMAGE" in {r.QueryRetrieveLevel for r in scp.get_requests}  # mixed series


def test_instance_in_another_syntax_than_the_pacs_lists_is_put_aside() -> None:
    """A PACS that lists AvailableTransferSyntaxUID (JPEG-LS here) but sends something else."""
    study_uid, datasets = study("LISTEDTS", 2)
    for ds in datasets:
        ds.AvailableTransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    with MisbehavingSCP(datasets) as scp:
        stream = get_study(connect(scp, timeout=10), study_uid)
        assert list(stream) == []
        assert len(stream.rejected) == 2
        assert "converted" in stream.rejected[0]
        assert study_uid not in stream.rejected[0]


# --- the lab's Orthanc servers: 12 syntaxes x 6 SOP classes -----------------------------------

SAMPLES = [  # pydicom's bundled test files, one per transfer syntax
    "CT_small.dcm",  # Explicit VR Little Endian
    "MR_small_implicit.dcm",  # Implicit VR Little Endian
    "MR_small_bigendian.dcm",  # Explicit VR Big Endian
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline
    "JPGExtended.dcm",  # JPEG Extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS Near-Lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_RLE.dcm",  # RLE Lossless
]
CLASSES = [CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage,
           ComputedRadiographyImageStorage, UltrasoundImageStorage,
           "1.2.840.10008.5.1.4.1.1.20"]  # NM Image


@pytest.fixture(scope="module")
def many_syntaxes(lab, tmp_path_factory) -> tuple[str, dict[str, Dataset]]:
    """A study in orthanc1 mixing 12 transfer syntaxes and 6 SOP classes (two per series):
    its StudyInstanceUID and the original data sets by SOPInstanceUID."""
    folder = tmp_path_factory.mktemp("many-syntaxes")
    study_uid = generate_uid()
    series = [generate_uid() for _ in range(len(SAMPLES) // 2)]
    originals: dict[str, Dataset] = {}
    paths = []
    for i, name in enumerate(SAMPLES):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.PatientID, ds.PatientName = "SYNTAX01", "Syntax^Many"
        # One study date for all (the samples differ, some have none): Orthanc takes the
        # study's from whichever instance the parallel upload stores first.
        ds.StudyDate = "20040119"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series[i // 2]
        ds.SeriesNumber = i // 2 + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CLASSES[i % len(CLASSES)]
        path = folder / f"{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        originals[str(ds.SOPInstanceUID)] = pydicom.dcmread(path)
        paths.append(path)
    assert len({str(ds.file_meta.TransferSyntaxUID) for ds in originals.values()}) == 12
    assert lab.orthanc1.upload(paths) == len(paths)
    return study_uid, originals


def assert_byte_exact(originals: dict[str, Dataset], received: dict[str, bytes]) -> None:
    """Every original arrived once, in its own transfer syntax, with identical pixel data."""
    assert sorted(received) == sorted(originals)
    for uid, data in received.items():
        original, got = originals[uid], pydicom.dcmread(io.BytesIO(data))
        syntax = original.file_meta.TransferSyntaxUID
        assert got.file_meta.TransferSyntaxUID == syntax, syntax.name
        assert got.PixelData == original.PixelData, syntax.name


@pytest.mark.parametrize("method", ["c-get", "c-move", "wado-rs"])
def test_many_syntaxes_and_classes_arrive_byte_exact(lab, many_syntaxes, method) -> None:
    study_uid, originals = many_syntaxes
    manifest = find.manifest(lab.connection("orthanc1"), study_uid)
    assert len(manifest.sop_classes) * 39 > 128  # more than one association can offer
    with lab.retriever("orthanc1", method) as retriever:
        stream = retriever.retrieve(study_uid, (), frozenset(manifest.sop_classes))
        received = {i.sop_instance_uid: i.data for i in stream}
    assert not stream.rejected
    assert_byte_exact(originals, received)


def test_many_syntaxes_pacs_to_pacs_byte_exact(lab, many_syntaxes) -> None:
    study_uid, originals = many_syntaxes
    manifest = find.manifest(lab.connection("orthanc1"), study_uid)
    with lab.retriever("orthanc1", "c-get") as retriever:
        result = store_instances(lab.connection("orthanc2"),
                                 retriever.retrieve(study_uid, (),
                                                    frozenset(manifest.sop_classes)))
    assert result.ok, result.failed
    client = lab.orthanc2.client
    at_destination = {}
    for uid in originals:
        (match,) = client.post("/tools/lookup", content=uid).json()
        at_destination[uid] = client.get(f"/instances/{match['ID']}/file").content
    assert_byte_exact(originals, at_destination)

