"""C-STORE to destinations that refuse, and to destinations that need many contexts.

Guarantees: a destination's refusal (0xA9xx, 0xCxxx, 0x0122, ...) is permanent and reported
with its status code and the server's comment, never with an instance's UID, and the study is
not tried again; 'out of resources' (0xA7xx) stays retriable; a stream of more (SOP class,
transfer syntax) pairs than one association can carry is stored with each instance in its own
syntax over several associations.
"""

from __future__ import annotations

import copy
import io

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, uid_to_service_class

from adit_tasks.core.errors import DestinationRefused, PacsBusy, PermanentError, is_retriable
from adit_tasks.core.instances import STORAGE_SOP_CLASSES, DicomInstance
from adit_tasks.core.store import store_instances
from tests.scp import MisbehavingSCP
from tests.test_misbehaving_peers import connect, study, uids


def as_instance(ds: Dataset) -> DicomInstance:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return DicomInstance.from_bytes(buffer.getvalue())


@pytest.mark.parametrize("code,comment,reason", [
    (0xA900, "Data set does not match SOP class", "0xA900 Data Set Does Not Match SOP Class"),
    (0xC211, "", "0xC211 Cannot Understand"),
    (0x0122, "", "0x0122 Refused: SOP Class Not Supported"),
])
def test_refusals_are_permanent_with_status_and_comment(code: int, comment: str,
                                                        reason: str) -> None:
    study_uid, datasets = study(f"REF{code:04X}", 3)
    with MisbehavingSCP(store_status=code, store_comment=comment) as scp:
        result = store_instances(connect(scp), [as_instance(ds) for ds in datasets])
    assert result.stored == []
    assert result.refused == {uid: reason for uid in uids(datasets)}
    assert result.failed == result.refused and result.permanent
    assert result.summary() == f"refused 3 instances: {reason} (3)"
    error = result.error("orthanc2")
    assert isinstance(error, DestinationRefused) and isinstance(error, PermanentError)
    assert not is_retriable(error)
    assert reason in str(error) and "orthanc2" in str(error)
    for uid in (study_uid, *uids(datasets)):
        assert uid not in str(error)


def test_server_comment_is_never_repeated() -> None:
    """ErrorComment is free text from the peer: a PACS may put the patient's name in it."""
    _, datasets = study("REFCMT", 1)
    uid = "1.2.826.0.1.3680043.8.498.4711"
    comment = f"Zyxdoe^Jane ZYX123 {uid}\x07"
    with MisbehavingSCP(store_status=0xA900, store_comment=comment) as scp:
        result = store_instances(connect(scp), [as_instance(datasets[0])])
    (reason,) = result.refused.values()
    assert reason == "0xA900 Data Set Does Not Match SOP Class"
    for value in ("Zyxdoe", "ZYX123", uid):
        assert value not in result.summary() and value not in str(result.error("pacs"))


def test_sop_class_the_destination_does_not_take_is_a_permanent_refusal() -> None:
    _, ct = study("REFCTX", 2)
    mr = copy.deepcopy(ct[0])
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    with MisbehavingSCP(storage_classes=[CTImageStorage]) as scp:
        result = store_instances(connect(scp), [as_instance(ds) for ds in [*ct, mr]])
    assert sorted(result.stored) == sorted(uids(ct))
    assert result.refused == {str(mr.SOPInstanceUID): "presentation context rejected: MR Image "
                              "Storage in Explicit VR Little Endian (nor the other "
                              "uncompressed syntax) not accepted"}
    assert isinstance(result.error("dest"), DestinationRefused)


def test_out_of_resources_stays_retriable() -> None:
    _, datasets = study("REFBUSY", 2)
    with MisbehavingSCP(store_status=0xA702) as scp, pytest.raises(PacsBusy) as info:
        store_instances(connect(scp), [as_instance(ds) for ds in datasets])
    assert is_retriable(info.value) and "0xA702" in str(info.value)


def test_more_pairs_than_one_association_carries_each_in_its_own_syntax() -> None:
    """70 SOP classes x 2 uncompressed contexts = 140 contexts: more than 128."""
    classes = [uid for uid in STORAGE_SOP_CLASSES
               if uid_to_service_class(uid) is StorageServiceClass][:70]
    _, (template,) = study("MANYPAIRS", 1)
    instances, sent = [], {}
    for i, sop_class in enumerate(classes):
        ds = copy.deepcopy(template)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        syntax = ImplicitVRLittleEndian if i % 2 else ExplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = syntax
        instances.append(as_instance(ds))
        sent[str(ds.SOPInstanceUID)] = syntax
    with MisbehavingSCP(storage_classes=classes) as scp:
        result = store_instances(connect(scp, timeout=10), instances)
        assert result.ok, result.failed
        assert sorted(result.stored) == sorted(sent)
        assert {str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID)
                for ds in scp.stored} == sent
        assert scp.established >= 2


def test_refused_study_is_not_retried(lab, prefect_server, tmp_path) -> None:
    from flows.transfer import transfer_flow
    from tests.test_transfer_flow import _task_runs

    spec = lab.demo[0]
    with MisbehavingSCP(ae_title="REFUSER", store_status=0xA900,
                        store_comment="Data set does not match SOP class") as scp:
        nodes = lab.nodes_file_in(tmp_path, {"name": "refuser", "ae_title": "REFUSER",
                                             "host": "127.0.0.1", "port": scp.port,
                                             "timeout": 10})
        state = transfer_flow("orthanc1", "refuser", [spec.study_uid], nodes_file=nodes,
                              return_state=True)
    assert state.is_failed()
    (row,) = state.result(raise_on_failure=False)
    assert row.status == "failure"
    assert "0xA900" in row.message and "does not match" in row.message.lower()
    assert spec.study_uid not in row.message
    assert _task_runs(state) == {"study-1": 1}
