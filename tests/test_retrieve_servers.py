"""Retrieval of a 150-instance study by C-GET, C-MOVE and WADO-RS, and C-STORE onwards."""

from __future__ import annotations

import hashlib
import threading

import pydicom
import pytest

from adit_tasks.core import find
from adit_tasks.core.errors import StudyNotFound
from adit_tasks.core.store import store_instances
from tests.conftest import read_pixels

CASES = [("orthanc1", "c-get"), ("orthanc1", "c-move"), ("orthanc1", "wado-rs"),
         ("dcmqrscp", "c-get"), ("dcmqrscp", "c-move")]


def _originals(lab) -> dict[str, str]:
    """SOPInstanceUID -> sha256 of the pixel data, from the generated files."""
    out = {}
    for path in lab.ct_files:
        ds = pydicom.dcmread(path)
        out[ds.SOPInstanceUID] = hashlib.sha256(ds.PixelData).hexdigest()
    return out


@pytest.mark.parametrize("server,method", CASES)
def test_study_arrives_complete_with_identical_pixels(lab, server, method) -> None:
    manifest = find.manifest(lab.connection(server), lab.ct.study_uid)
    received = {}
    with lab.retriever(server, method) as retriever:
        for instance in retriever.retrieve(lab.ct.study_uid, (),
                                           frozenset(manifest.sop_classes)):
            assert instance.study_uid == lab.ct.study_uid
            received[instance.sop_instance_uid] = hashlib.sha256(
                read_pixels(instance.data)).hexdigest()
    assert received == _originals(lab)


@pytest.mark.parametrize("server", ["orthanc1", "dcmqrscp"])
def test_two_c_moves_at_once_to_one_receiver(lab, server) -> None:
    studies = [lab.ct.study_uid, lab.demo[0].study_uid]
    errors: list[BaseException] = []
    counts: dict[str, int] = {}

    def run_counting(uid: str) -> None:
        try:
            n = 0
            for inst in retriever.retrieve(uid):
                assert inst.study_uid == uid  # never another retrieval's instance
                n += 1
            counts[uid] = n
        except BaseException as exc:
            errors.append(exc)

    with lab.retriever(server, "c-move") as retriever:
        threads = [threading.Thread(target=run_counting, args=(uid,)) for uid in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert counts == {lab.ct.study_uid: 150, lab.demo[0].study_uid: lab.demo[0].instance_count}


@pytest.mark.parametrize("method", ["c-get", "c-move", "wado-rs"])
def test_compressed_samples_arrive_byte_for_byte(lab, method) -> None:
    conn = lab.connection("orthanc1")
    for path in lab.samples:
        original = pydicom.dcmread(path)
        uid = original.StudyInstanceUID
        manifest = find.manifest(conn, uid)
        with lab.retriever("orthanc1", method) as retriever:
            got = [i for i in retriever.retrieve(uid, (), frozenset(manifest.sop_classes))
                   if i.sop_instance_uid == original.SOPInstanceUID]
        assert len(got) == 1, path.name
        instance = got[0]
        assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID, path.name
        assert read_pixels(instance.data) == original.PixelData, path.name


def test_selected_series_only(lab) -> None:
    spec = max(lab.demo, key=lambda s: len(s.series))
    wanted = spec.series_uid(spec.series[0])
    for method in ("c-get", "c-move", "wado-rs"):
        with lab.retriever("orthanc1", method) as retriever:
            got = list(retriever.retrieve(spec.study_uid, (wanted,)))
        assert {i.series_uid for i in got} == {wanted}, method
        assert len(got) == spec.series[0].instances, method


@pytest.mark.parametrize("method", ["c-get", "c-move", "wado-rs"])
def test_unknown_study_is_a_permanent_error(lab, method) -> None:
    with lab.retriever("orthanc1", method) as retriever, pytest.raises(StudyNotFound):
        list(retriever.retrieve("1.2.3.4.5.6.7"))


def test_c_store_to_second_orthanc_lands_every_instance(lab) -> None:
    source = lab.connection("orthanc1")
    dest = lab.connection("orthanc2")
    uids = [lab.ct.study_uid] + [
        pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in lab.samples]
    with lab.retriever("orthanc1", "c-get") as from_source:
        for uid in dict.fromkeys(uids):
            result = store_instances(dest, from_source.retrieve(uid))
            assert result.ok, result.failed
            expected = find.manifest(source, uid)
            landed = find.manifest(dest, uid)
            assert set(landed.instances) == set(expected.instances)
    # Compressed samples keep their transfer syntax at the destination.
    for path in lab.samples:
        original = pydicom.dcmread(path)
        with lab.retriever("orthanc2", "c-get") as from_dest:
            stream = from_dest.retrieve(original.StudyInstanceUID, (),
                                        frozenset([original.SOPClassUID]))
        got = next(i for i in stream if i.sop_instance_uid == original.SOPInstanceUID)
        stream.close()
        assert got.transfer_syntax_uid == original.file_meta.TransferSyntaxUID, path.name
