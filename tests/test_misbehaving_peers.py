"""ADIT against DICOM peers that misbehave: rejections, aborts, stalls, failures, busy servers,
concurrency limits and C-MOVE routing, with the in-process SCP of `tests/scp.py`."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest
from pydicom import Dataset

from adit_tasks.core.association import Connection
from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import (
    AssociationError,
    AssociationRejected,
    DimseTimeout,
    IncompleteRetrieval,
    PacsBusy,
    PermanentError,
    RetriableError,
    StudyNotFound,
)
from adit_tasks.core.find import Query, echo, find_studies, manifest
from adit_tasks.core.get import get_study
from adit_tasks.core.instances import DicomInstance, InstanceStream
from adit_tasks.core.move import move_study
from adit_tasks.core.receiver import Receiver
from adit_tasks.core.store import store_instances
from adit_tasks.lab.servers import free_port
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study, uid_for
from tests.scp import LOOPBACK, MisbehavingSCP, wait_for

TIMEOUT = 2.0
_node_numbers = itertools.count(1)


def study(tag: str, instances: int = 4) -> tuple[str, list[Dataset]]:
    """A small CT study (32x32 pixels): its StudyInstanceUID and its datasets."""
    spec = StudySpec(
        patient_id=f"MISB{tag}",
        patient_name="Peer^Test",
        birth_date="19700101",
        study_date="20240101",
        study_time="120000",
        accession=f"ACCMISB{tag}",
        study_description="misbehaving peers",
        series=(SeriesSpec(modality="CT", description="axial", number=1, instances=instances,
                           rows=32, columns=32),),
    )
    return spec.study_uid, list(make_study(spec))


def uids(datasets: list[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]


def connect(scp: MisbehavingSCP | None = None, *, port: int | None = None,
            timeout: float = TIMEOUT, max_associations: int = 2) -> Connection:
    """A connection to `scp` through a node with a name of its own (so its own local slot)."""
    node = ServerNode(
        name=f"peer-{next(_node_numbers)}",
        ae_title=scp.ae_title if scp else "NOBODY",
        host=LOOPBACK,
        port=port or (scp.port if scp else free_port()),
        timeout=timeout,
        max_associations=max_associations,
    )
    return Connection(node, "ADIT")


def drain(stream: InstanceStream) -> list[DicomInstance]:
    return list(stream)


def in_threads(*calls: Callable[[], object], timeout: float = 30) -> list[object]:
    """Run `calls` at the same time; their results (or exceptions), in order."""
    results: list[object] = [None] * len(calls)

    def run(i: int, call: Callable[[], object]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c), daemon=True)
               for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a concurrent call hung"
    return results


# --- a well-behaved peer first: the SCP itself works --------------------------------------------


def test_well_behaved_peer_serves_echo_find_get_and_store() -> None:
    study_uid, datasets = study("OK", 3)
    with MisbehavingSCP(datasets) as scp:
        conn = connect(scp)
        echo(conn)
        studies = find_studies(conn, Query(study_uid=study_uid))
        assert [s.StudyInstanceUID for s in studies] == [study_uid]
        assert studies[0].NumberOfStudyRelatedInstances == 3
        assert set(manifest(conn, study_uid).instances) == set(uids(datasets))
        got = drain(get_study(conn, study_uid))
        assert sorted(i.sop_instance_uid for i in got) == sorted(uids(datasets))
        result = store_instances(conn, got)
        assert result.ok and sorted(result.stored) == sorted(uids(datasets))
        assert sorted(uids(scp.stored)) == sorted(uids(datasets))
        assert scp.wait_idle()


# --- associations ---------------------------------------------------------------------------------


def test_permanent_rejection_is_association_rejected() -> None:
    with MisbehavingSCP(reject="permanent") as scp, \
            pytest.raises(AssociationRejected) as info:
        echo(connect(scp))
    assert isinstance(info.value, PermanentError)
    assert scp.established == 0


def test_transient_rejection_is_retriable() -> None:
    with MisbehavingSCP(reject="transient") as scp, pytest.raises(RetriableError) as info:
        echo(connect(scp))
    assert not isinstance(info.value, PermanentError)
    assert scp.established == 0


def test_nothing_listening_is_association_error() -> None:
    with pytest.raises(AssociationError):
        echo(connect(port=free_port()))


# --- C-GET failures -------------------------------------------------------------------------------


def test_get_aborted_mid_study_raises_retriable_and_keeps_what_arrived() -> None:
    study_uid, datasets = study("ABORT", 6)
    with MisbehavingSCP(datasets, abort_after=3) as scp:
        stream = get_study(connect(scp), study_uid)
        received: list[str] = []
        with pytest.raises(RetriableError):
            for instance in stream:
                received.append(instance.sop_instance_uid)
        assert received == uids(datasets)[:3]
        assert scp.sent == received
        assert wait_for(lambda: scp.aborted == 1), "the SCP did not abort"
        assert scp.wait_idle()


@pytest.mark.parametrize("operation", ["c-find", "c-get"])
def test_stalled_server_times_out(operation: str) -> None:
    study_uid, datasets = study("STALL", 2)
    stall = 8.0
    with MisbehavingSCP(datasets, stall_seconds=stall) as scp:
        conn = connect(scp, timeout=1.0)
        with pytest.raises(DimseTimeout):
            if operation == "c-find":
                find_studies(conn, Query(study_uid=study_uid))
            else:
                drain(get_study(conn, study_uid))
        # It gave up on its own: the stalled server never got to answer.
        assert not scp.sent


def test_failed_sub_operations_are_incomplete_retrieval() -> None:
    study_uid, datasets = study("FAIL", 5)
    with MisbehavingSCP(datasets, fail_subops=2) as scp:
        stream = get_study(connect(scp), study_uid)
        received: list[str] = []
        with pytest.raises(IncompleteRetrieval) as info:
            for instance in stream:
                received.append(instance.sop_instance_uid)
        assert info.value.expected == 5
        assert info.value.received == 3
        assert received == uids(datasets)[:3] == scp.sent


@pytest.mark.parametrize("operation", ["c-find", "c-get"])
def test_busy_server_is_pacs_busy(operation: str) -> None:
    study_uid, datasets = study("BUSY", 2)
    with MisbehavingSCP(datasets, busy=True) as scp, pytest.raises(PacsBusy):
        conn = connect(scp)
        if operation == "c-find":
            find_studies(conn, Query(study_uid=study_uid))
        else:
            drain(get_study(conn, study_uid))


def test_unknown_study_is_study_not_found() -> None:
    _, datasets = study("KNOWN", 2)
    with MisbehavingSCP(datasets) as scp, pytest.raises(StudyNotFound) as info:
        drain(get_study(connect(scp), uid_for("no such study")))
    assert isinstance(info.value, PermanentError)


# --- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2])
def test_max_associations_limits_concurrent_associations(limit: int) -> None:
    study_uid, datasets = study("LIMIT", 4)
    with MisbehavingSCP(datasets, delay_per_instance=0.15) as scp:
        conn = connect(scp, max_associations=limit)
        results = in_threads(lambda: drain(get_study(conn, study_uid)),
                             lambda: drain(get_study(conn, study_uid)))
        for result in results:
            assert not isinstance(result, BaseException), result
            assert sorted(i.sop_instance_uid for i in result) == sorted(uids(datasets))
        assert scp.established == 2
        assert scp.max_concurrent == limit


# --- C-MOVE routing -------------------------------------------------------------------------------


@pytest.mark.parametrize("omit_originator", [False, True], ids=["message-id", "study-uid"])
def test_concurrent_moves_route_each_study_to_its_stream(
    receiver: Receiver, omit_originator: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid_a, study_a = study("MOVEA", 4)
    uid_b, study_b = study("MOVEB", 3)
    seen_ids: list[int | None] = []
    find_route = receiver._find_route

    def recording_find_route(msg_id: int | None, *args: object) -> object:
        seen_ids.append(msg_id)
        return find_route(msg_id, *args)

    monkeypatch.setattr(receiver, "_find_route", recording_find_route)
    with MisbehavingSCP(study_a + study_b, delay_per_instance=0.1,
                        move_destinations={"ADIT": (LOOPBACK, receiver.port)},
                        omit_move_originator=omit_originator) as scp:
        conn = connect(scp)
        got_a, got_b = in_threads(lambda: drain(move_study(conn, receiver, uid_a)),
                                  lambda: drain(move_study(conn, receiver, uid_b)))
        assert not isinstance(got_a, BaseException), got_a
        assert not isinstance(got_b, BaseException), got_b
        assert sorted(i.sop_instance_uid for i in got_a) == sorted(uids(study_a))
        assert sorted(i.sop_instance_uid for i in got_b) == sorted(uids(study_b))
        assert scp.max_concurrent == 2  # the two moves really ran at the same time
    assert len(seen_ids) == 7
    if omit_originator:
        assert seen_ids == [None] * 7  # routed by Study Instance UID
    else:
        assert None not in seen_ids and len(set(seen_ids)) == 2


# --- a consumer that stops early ------------------------------------------------------------------


def test_consumer_stopping_early_ends_producer_and_association() -> None:
    study_uid, datasets = study("EARLY", 10)
    with MisbehavingSCP(datasets, delay_per_instance=0.1) as scp:
        conn = connect(scp, max_associations=1)
        stream = get_study(conn, study_uid)
        taken = []
        for instance in stream:
            taken.append(instance.sop_instance_uid)
            if len(taken) == 2:
                break
        stream.close()
        producer = f"c-get-{conn.node.name}"
        assert not any(t.name == producer and t.is_alive() for t in threading.enumerate())
        assert taken == uids(datasets)[:2]
        assert scp.wait_idle(5), "the SCP still sees the association open"
        assert wait_for(lambda: scp.aborted == 1), "the SCP saw no abort"
        assert len(scp.sent) < len(datasets)
        # The node's only association slot was given back: a new association gets through.
        (result,) = in_threads(lambda: echo(conn), timeout=10)
        assert not isinstance(result, BaseException), result


def test_consumer_stopping_early_does_not_wait_for_the_dimse_timeout() -> None:
    study_uid, datasets = study("EARLYSLOW", 10)
    with MisbehavingSCP(datasets, delay_per_instance=0.1) as scp:
        # A node timeout longer than close()'s 30 s wait: a producer that waited for it
        # would still be alive when close() returns.
        stream = get_study(connect(scp, timeout=60.0), study_uid)
        for count, _ in enumerate(stream, start=1):
            if count == 2:
                break
        stream.close()
        assert not stream._thread.is_alive()


def test_consumer_stopping_early_ends_c_move(receiver: Receiver) -> None:
    study_uid, datasets = study("MOVEEARLY", 12)
    with MisbehavingSCP(datasets, delay_per_instance=0.25,
                        move_destinations={"ADIT": (LOOPBACK, receiver.port)}) as scp:
        stream = move_study(connect(scp), receiver, study_uid)
        for count, _ in enumerate(stream, start=1):
            if count == 2:
                break
        stream.close()
        assert not stream._thread.is_alive()
        assert len(scp.sent) < len(datasets), "the PACS went on sending the whole study"


def test_store_converts_to_the_only_syntax_a_strict_server_accepts() -> None:
    """A server that takes Implicit VR only gets explicit-VR instances re-encoded, losslessly."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE, evt

    from adit_tasks.core.instances import DicomInstance
    from adit_tasks.lab.synthetic import ct_study_spec

    received: list[tuple[str, bytes]] = []

    def on_store(event):
        ds = event.dataset
        received.append((str(event.context.transfer_syntax), ds.PixelData))
        return 0x0000

    ae = AE(ae_title="STRICT")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ImplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        import io as _io

        datasets = list(make_study(ct_study_spec(3)))
        instances = []
        for ds in datasets:
            buf = _io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            instances.append(DicomInstance.from_bytes(buf.getvalue()))
        node = ServerNode(name="strict", ae_title="STRICT", host=LOOPBACK, port=port,
                          timeout=10)
        result = store_instances(Connection(node, "ADIT"), instances)
        assert sorted(result.stored) == sorted(uids(datasets))
        assert [ts for ts, _ in received] == [ImplicitVRLittleEndian] * 3
        assert sorted(p for _, p in received) == sorted(ds.PixelData for ds in datasets)
    finally:
        server.shutdown()
