"""The C-MOVE receiver against senders that are not the PACS a pending C-MOVE went to.

Guarantee: while a C-MOVE is pending, the receiver takes an instance only from the AE title
(and address) of the node that C-MOVE was sent to, and only for that C-MOVE; everything else
is refused with a failure status and logged without patient data.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import AditError, RetriableError
from adit_tasks.core.instances import InstanceStream
from adit_tasks.core.move import move_study
from adit_tasks.core.receiver import Receiver
from tests.scp import LOOPBACK, MisbehavingSCP
from tests.test_misbehaving_peers import connect, study, uids

REFUSED_NOT_AUTHORISED = 0x0124  # PS3.7 C.5.26 Refused: Not Authorised
OTHER_LOOPBACK = "127.0.0.2"  # still this machine, but not the address a node's host names


@dataclass
class Pending:
    """A C-MOVE that is under way, its PACS holding back the instances until released."""

    scp: MisbehavingSCP
    stream: InstanceStream
    msg_id: int
    hold: threading.Event

    def finish(self) -> list[str]:
        self.hold.set()
        return sorted(i.sop_instance_uid for i in self.stream)


@pytest.fixture
def pending_moves(receiver: Receiver) -> Iterator[callable]:
    """Start C-MOVEs that stay pending; every SCP started here is stopped afterwards."""
    started: list[Pending] = []

    def start(scp_ae_title: str, datasets: list[Dataset], study_uid: str,
              **node: object) -> Pending:
        """A C-MOVE to an SCP calling itself `scp_ae_title`, through a node with the fields
        `node` changed."""
        hold = threading.Event()
        scp = MisbehavingSCP(datasets, ae_title=scp_ae_title, hold=hold,
                             move_destinations={"ADIT": (LOOPBACK, receiver.port)}).start()
        conn = connect(scp, timeout=15)
        if node:
            conn = type(conn)(conn.node.model_copy(update=node), conn.calling_ae)
        before = set(receiver._routes)
        stream = move_study(conn, receiver, study_uid)
        assert scp.move_requested.wait(10), "the C-MOVE did not reach the PACS"
        (msg_id,) = set(receiver._routes) - before
        pending = Pending(scp, stream, msg_id, hold)
        started.append(pending)
        return pending

    try:
        yield start
    finally:
        for pending in started:
            pending.hold.set()
            pending.stream.close()
            pending.scp.stop()


def forged(datasets: list[Dataset], study_uid: str | None = None) -> Dataset:
    """An instance that looks like one of `datasets` (same study unless `study_uid`)."""
    ds = copy.deepcopy(datasets[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if study_uid:
        ds.StudyInstanceUID = study_uid
    return ds


def send(receiver: Receiver, calling_ae: str, ds: Dataset, msg_id: int | None, *,
         source: str = LOOPBACK) -> int | str:
    """C-STORE `ds` to the receiver as `calling_ae` from `source`: the status, or 'rejected'
    when the association itself was rejected."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, receiver.port, ae_title="ADIT", bind_address=(source, 0))
    if assoc.is_rejected:
        return "rejected"
    assert assoc.is_established
    try:
        kwargs = {"originator_aet": "ADIT", "originator_id": msg_id} if msg_id else {}
        status = assoc.send_c_store(ds, **kwargs)
        return int(status.Status)
    finally:
        assoc.release()


def test_outsider_ae_cannot_inject_into_a_pending_move(
        receiver: Receiver, pending_moves, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="adit_tasks.core.receiver")
    study_uid, datasets = study("INJECT", 3)
    move = pending_moves("PACSA", datasets, study_uid)
    intruder = forged(datasets)
    # An AE title no pending C-MOVE went to: rejected when it asks for an association,
    # with or without the pending C-MOVE's Message ID.
    assert send(receiver, "OUTSIDER", intruder, move.msg_id) == "rejected"
    assert send(receiver, "OUTSIDER", intruder, None) == "rejected"
    assert move.finish() == sorted(uids(datasets))  # exactly the PACS's instances
    assert "OUTSIDER" in caplog.text and "rejected" in caplog.text
    for uid in (study_uid, str(intruder.SOPInstanceUID), "Peer^Test", "MISBINJECT"):
        assert uid not in caplog.text


def test_known_ae_may_send_only_for_its_own_move(
        receiver: Receiver, pending_moves, caplog: pytest.LogCaptureFixture) -> None:
    """PACSB has a C-MOVE pending too (so its associations are accepted), but not for study A:
    it cannot add to A's retrieval, by A's Message ID nor by A's study UID."""
    caplog.set_level(logging.INFO, logger="adit_tasks.core.receiver")
    uid_a, study_a = study("OWNA", 3)
    uid_b, study_b = study("OWNB", 2)
    move_a = pending_moves("PACSA", study_a, uid_a)
    move_b = pending_moves("PACSB", study_b, uid_b)
    into_a = forged(study_a)
    assert send(receiver, "PACSB", into_a, move_a.msg_id) == REFUSED_NOT_AUTHORISED
    assert send(receiver, "PACSB", into_a, None) == REFUSED_NOT_AUTHORISED
    # The right AE without the Message ID, for a study no C-MOVE of it asked for.
    unrelated = forged(study_a, study_uid=generate_uid())
    assert send(receiver, "PACSA", unrelated, None) == REFUSED_NOT_AUTHORISED
    # ... and with its own move's Message ID but another study.
    assert send(receiver, "PACSA", unrelated, move_a.msg_id) == REFUSED_NOT_AUTHORISED
    assert move_a.finish() == sorted(uids(study_a))
    assert move_b.finish() == sorted(uids(study_b))
    assert "PACSB" in caplog.text and "node 'peer-" in caplog.text
    for uid in (uid_a, uid_b, str(into_a.SOPInstanceUID), str(unrelated.StudyInstanceUID)):
        assert uid not in caplog.text


def test_right_ae_from_another_address_is_refused(
        receiver: Receiver, pending_moves, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="adit_tasks.core.receiver")
    study_uid, datasets = study("ADDR", 3)
    move = pending_moves("PACSA", datasets, study_uid)  # node host 127.0.0.1: the default
    intruder = forged(datasets)
    for msg_id in (move.msg_id, None):
        assert send(receiver, "PACSA", intruder, msg_id,
                    source=OTHER_LOOPBACK) == REFUSED_NOT_AUTHORISED
    assert move.finish() == sorted(uids(datasets))
    assert OTHER_LOOPBACK in caplog.text and "address" in caplog.text
    assert study_uid not in caplog.text


def test_configured_sender_addresses_replace_the_host(receiver: Receiver, pending_moves
                                                      ) -> None:
    """A PACS that sends from another address than its host (NAT, a cluster) is configured
    with `move_sender_addresses`; its own host is then no longer accepted."""
    study_uid, datasets = study("NAT", 2)
    move = pending_moves("PACSA", datasets, study_uid,
                         move_sender_addresses=[f"{OTHER_LOOPBACK}/32"])
    from_nat = forged(datasets)
    assert send(receiver, "PACSA", from_nat, move.msg_id, source=OTHER_LOOPBACK) == 0x0000
    # The PACS itself sends from 127.0.0.1, which is not listed: all refused.
    move.hold.set()
    arrived = []
    with pytest.raises(RetriableError):  # every sub-operation of the PACS failed
        for instance in move.stream:
            arrived.append(instance.sop_instance_uid)
    assert arrived == [str(from_nat.SOPInstanceUID)]


def test_move_sender_addresses_are_validated() -> None:
    base = dict(name="n", ae_title="PACS", host="127.0.0.1", port=104)
    assert ServerNode(**base, move_sender_addresses=["any"]).move_sender_addresses == ["any"]
    assert ServerNode(**base, move_sender_addresses=["10.0.0.0/8", "::1"])
    for bad in (["pacs.example.org"], ["any", "10.0.0.1"]):
        with pytest.raises(ValueError):
            ServerNode(**base, move_sender_addresses=bad)


def test_pacs_that_sends_under_another_ae_title_is_configured_so(receiver: Receiver,
                                                                 pending_moves) -> None:
    """The PACS answers C-MOVE as PACSQR but sends as PACSSCU: only `move_sender_ae_title`
    lets its instances in."""
    study_uid, datasets = study("SCUAE", 2)
    move = pending_moves("PACSSCU", datasets, study_uid, ae_title="PACSQR",
                         move_sender_ae_title="PACSSCU")
    assert move.finish() == sorted(uids(datasets))
    study_uid, datasets = study("SCUAE2", 2)
    move = pending_moves("PACSSCU", datasets, study_uid, ae_title="PACSQR")
    move.hold.set()
    with pytest.raises(AditError):
        list(move.stream)
    assert not move.scp.sent
