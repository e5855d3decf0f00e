"""An instance that fails the leak check is withheld by the transfer: never written, counted,
and named by attribute in the study's warning. No servers: a fake source, a real folder."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from adit_tasks.core import pseudonymize as pseudonymize_module
from adit_tasks.core import transfer
from adit_tasks.core.find import Instance, Study, StudyManifest
from adit_tasks.core.instances import InstanceStream
from adit_tasks.core.pseudonymize import Pseudonymizer
from adit_tasks.core.results import StudyJob
from adit_tasks.core.sinks import FolderSink
from tests.dicom_builders import CT_SOP_CLASS, minimal_dataset, to_instance

SECRET = "test-secret-of-the-project"
STUDY = "1.2.826.0.1.3680043.8.498.31337"


def _instances():
    out = []
    for i, comment in enumerate(["Kontrolle", "Jörg Größmann, Kontrolle", "Kontrolle"]):
        ds = minimal_dataset("Größmann^Jörg", "PID12345")
        ds.StudyInstanceUID = STUDY
        ds.SeriesInstanceUID = STUDY + ".1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{STUDY}.1.{i + 1}"
        ds.StudyDate = "20240318"
        ds.ImageComments = comment
        out.append(to_instance(ds))
    return out


@pytest.fixture
def forgetful_cleaning(monkeypatch):
    """A cleaning that misses names in ImageComments: the gap the leak check is there for."""
    real = pseudonymize_module.scrub

    def scrub(text, pattern, uid=None):
        return text if "Kontrolle" in text else real(text, pattern, uid)

    monkeypatch.setattr(pseudonymize_module, "scrub", scrub)


def test_prepare_withholds_the_instance_that_fails_and_sends_the_others(forgetful_cleaning):
    instances = _instances()
    p = Pseudonymizer(SECRET)
    counts = transfer._Counts()
    sent = list(transfer._prepare(iter(instances), {i.sop_instance_uid for i in instances},
                                  set(), transfer.Pseudonymization(p), p.uid, counts))
    assert [s.sop_instance_uid for s in sent] == [p.uid(instances[0].sop_instance_uid),
                                                  p.uid(instances[2].sop_instance_uid)]
    assert counts.withheld == {p.uid(instances[1].sop_instance_uid):
                               "identifying value in ImageComments"}
    assert counts.left_out == set(counts.withheld)


def test_a_study_with_a_withheld_instance_ends_with_a_warning_naming_the_attribute(
        forgetful_cleaning, monkeypatch, tmp_path, caplog):
    instances = _instances()
    study = Study(PatientID="PID12345", PatientName="Größmann^Jörg", PatientBirthDate="",
                  StudyDate="20240318", StudyTime="101500", ModalitiesInStudy="CT",
                  StudyDescription="", AccessionNumber="", NumberOfStudyRelatedInstances=3,
                  StudyInstanceUID=STUDY)
    listing = StudyManifest(STUDY, (), {
        i.sop_instance_uid: Instance(STUDY, i.series_uid, i.sop_instance_uid, CT_SOP_CLASS)
        for i in instances})
    monkeypatch.setattr(transfer, "find_studies", lambda conn, query: [study])
    monkeypatch.setattr(transfer, "manifest", lambda conn, uid, series=(): listing)

    class Source:
        method = "fake"

        def retrieve(self, study_uid, series_uids, sop_classes, listed=None):
            return InstanceStream(lambda put: [put(i) for i in instances])

    plan = SimpleNamespace(source=SimpleNamespace(node=SimpleNamespace(name="pacs")),
                           sink=FolderSink(tmp_path), retriever=Source(),
                           pseudonymizer=Pseudonymizer(SECRET))
    caplog.set_level(logging.DEBUG)
    outcome = transfer.transfer_study(plan, StudyJob(STUDY))
    assert outcome.status == "warning"
    assert outcome.transferred == 2
    assert outcome.message == "1 instance(s) withheld: identifying value in ImageComments (1)"
    files = list(tmp_path.rglob("*.dcm"))
    assert len(files) == 2
    assert not any(b"Gr\xf6\xdfmann" in f.read_bytes() for f in files)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "ImageComments" in said and "Größmann" not in said and "Jörg" not in said

    # a re-run sends nothing more and still says why one is missing
    again = transfer.transfer_study(plan, StudyJob(STUDY))
    assert again.transferred == 0 and again.status == "warning"
