"""C-STORE: send a stream of instances to a DICOM server over one association.

A stream does not say up front which SOP classes and transfer syntaxes it will carry, so the
association is opened for what the first instance needs, and reopened with the union whenever
an instance needs a (SOP class, transfer syntax) pair the server has not accepted yet. Most
studies need one or two associations. Each instance is sent in its own transfer syntax; a
server that does not accept it gets it in an uncompressed syntax only if the instance is
uncompressed (lossless re-encoding), otherwise the instance is reported as failed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import Association, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from adit_tasks.core.association import MAX_CONTEXTS, Connection
from adit_tasks.core.errors import OperationFailed, PacsBusy
from adit_tasks.core.instances import UNCOMPRESSED, DicomInstance
from adit_tasks.core.status import check_status

logger = logging.getLogger(__name__)


@dataclass
class StoreResult:
    """What a C-STORE of a stream achieved."""

    stored: list[str] = field(default_factory=list)  # SOPInstanceUIDs
    failed: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason

    @property
    def ok(self) -> bool:
        return not self.failed


def _contexts(pairs: set[tuple[str, str]]) -> list:
    by_class: dict[str, set[str]] = {}
    for sop_class, ts in pairs:
        by_class.setdefault(sop_class, set()).add(ts)
    contexts = []
    for sop_class, syntaxes in sorted(by_class.items()):
        # One context per syntax, so the server accepts or refuses each one on its own.
        for ts in sorted(syntaxes | set(UNCOMPRESSED)):
            contexts.append(build_context(sop_class, ts))
    return contexts[:MAX_CONTEXTS]


def _accepts(assoc: Association, instance: DicomInstance) -> bool:
    wanted = {instance.transfer_syntax_uid}
    if instance.transfer_syntax_uid in UNCOMPRESSED:
        wanted = set(UNCOMPRESSED)
    return any(
        cx.abstract_syntax == instance.sop_class_uid and cx.transfer_syntax[0] in wanted
        for cx in assoc.accepted_contexts
    )


def store_instances(conn: Connection, instances: Iterable[DicomInstance]) -> StoreResult:
    """C-STORE every instance of the stream; failures are collected per instance."""
    result = StoreResult()
    pairs: set[tuple[str, str]] = set()
    tried: set[tuple[str, str]] = set()
    it: Iterator[DicomInstance] = iter(instances)
    pending: DicomInstance | None = next(it, None)
    while pending is not None:
        pairs.add((pending.sop_class_uid, pending.transfer_syntax_uid))
        with conn.associate(_contexts(pairs)) as assoc, _reactor_paused(assoc):
            tried |= pairs
            while pending is not None:
                key = (pending.sop_class_uid, pending.transfer_syntax_uid)
                if not _accepts(assoc, pending):
                    if key not in tried:
                        break  # reopen with this pair added
                    result.failed[pending.sop_instance_uid] = (
                        f"{conn.node.name} accepts neither SOP class {pending.sop_class_uid} "
                        f"in transfer syntax {pending.transfer_syntax_uid} nor uncompressed"
                    )
                else:
                    _store_one(conn, assoc, pending, result)
                pending = next(it, None)
    logger.info("%s: C-STORE stored %d instances, %d refused", conn.node.name,
                len(result.stored), len(result.failed))
    return result


def dataset_offset(data: bytes) -> int | None:
    """Where the data set starts in Part 10 bytes (after preamble and file meta), if the file
    meta starts with its group length as pydicom and pynetdicom write it."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


@contextlib.contextmanager
def _reactor_paused(assoc: Association) -> Iterator[None]:
    """Keep pynetdicom's reactor thread away from the association's messages while we send
    C-STOREs and read their responses ourselves (what send_c_store does per message).

    Pausing once per association, not per message: re-pausing right after a resume can see
    the reactor's stale "paused" flag, and then the reactor takes our response (seen as
    "Received unexpected C-STORE service message" and a DIMSE timeout).
    """
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def _payload(assoc: Association, instance: DicomInstance) -> tuple[int, bytes]:
    """(context ID, data set bytes): the received bytes as they are when the server accepted
    their syntax; else re-encoded losslessly into the accepted uncompressed syntax."""
    offset = dataset_offset(instance.data)
    for cx in assoc.accepted_contexts:
        if (cx.abstract_syntax == instance.sop_class_uid
                and cx.transfer_syntax[0] == instance.transfer_syntax_uid
                and offset is not None):
            return cx.context_id, instance.data[offset:]
    for cx in assoc.accepted_contexts:
        ts = UID(cx.transfer_syntax[0])
        if cx.abstract_syntax == instance.sop_class_uid and ts in UNCOMPRESSED:
            encoded = encode(instance.dataset, ts.is_implicit_VR, ts.is_little_endian)
            if encoded is None:
                raise ValueError("the instance could not be encoded")
            return cx.context_id, encoded
    raise ValueError("no accepted presentation context for the instance")


def _send(assoc: Association, instance: DicomInstance) -> Dataset | None:
    """One C-STORE request and its response, with the reactor paused (_reactor_paused).

    Sends the data set bytes as received, without decoding and re-encoding them
    (pynetdicom's send_c_store takes a Dataset or a file path only); saves ~1.5-2 ms per
    instance (benchmarks/transfer.py).
    """
    context_id, payload = _payload(assoc, instance)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = instance.sop_class_uid
    req.AffectedSOPInstanceUID = instance.sop_instance_uid
    req.Priority = 2
    req.DataSet = io.BytesIO(payload)
    assoc.dimse.send_msg(req, context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()
        return None
    return assoc._check_received_status(rsp)


def _store_one(conn: Connection, assoc: Association, instance: DicomInstance,
               result: StoreResult) -> None:
    try:
        code = check_status(conn.node, "C-STORE", _send(assoc, instance))
    except PacsBusy:
        raise  # the whole study is retried later
    except (OperationFailed, ValueError) as exc:
        result.failed[instance.sop_instance_uid] = str(exc)
        return
    if code != 0x0000:
        logger.info("%s: C-STORE warning 0x%04X", conn.node.name, code)
    result.stored.append(instance.sop_instance_uid)
    instance.__dict__.pop("dataset", None)  # free a parsed copy, if one was made
