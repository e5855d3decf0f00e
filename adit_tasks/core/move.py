"""C-MOVE: ask the PACS to send a study (or series) to our receiver, as a stream of instances.

The PACS must know our AE title (`ae_title` in the settings) with the receiver's host and port.
The receiver takes only what this C-MOVE asked for, from the node it was sent to (its AE title
and addresses, adit_tasks.core.receiver).
The final C-MOVE response only comes after the PACS got our answer to its last C-STORE, and we
answer each C-STORE only after the instance was handed to the stream, so when the final
response arrives every instance of this retrieval is in the stream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from adit_tasks.core.association import Connection
from adit_tasks.core.get import retrieve_identifier
from adit_tasks.core.instances import DicomInstance, InstanceStream, Rejected, StreamClosed
from adit_tasks.core.receiver import Receiver
from adit_tasks.core.status import SubOperations, check_retrieve_outcome, check_retrieve_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CMove:
    """Retrieval by C-MOVE to a receiver that whoever runs the work started (and stops)."""

    conn: Connection
    receiver: Receiver
    method: str = "c-move"

    def retrieve(self, study_uid: str, series_uids: tuple[str, ...] = (),
                 sop_classes: frozenset[str] = frozenset(),
                 instances: Mapping[str, str] | None = None) -> InstanceStream:
        # One association: the receiver routes one C-MOVE (Message ID) per study.
        return move_study(self.conn, self.receiver, study_uid, series_uids)


def move_study(
    conn: Connection,
    receiver: Receiver,
    study_uid: str,
    series_uids: Iterable[str] = (),
) -> InstanceStream:
    """Stream the instances of a study (or of the given series) by C-MOVE to `receiver`."""
    series = list(series_uids)
    model = StudyRootQueryRetrieveInformationModelMove

    def produce(put: Callable[[DicomInstance | Rejected], None]) -> None:
        total = SubOperations()
        consumer_gone = threading.Event()

        def put_or_flag(instance: DicomInstance | Rejected) -> None:
            try:
                put(instance)
            except StreamClosed:
                consumer_gone.set()
                raise

        with receiver.route(study_uid, frozenset(series), put_or_flag,
                            conn.node) as (msg_id, route), \
                conn.associate([build_context(model)]) as assoc:
            for series_uid in series or [""]:
                subops = SubOperations()
                identifier = retrieve_identifier(study_uid, series_uid)
                responses = assoc.send_c_move(identifier, receiver.ae_title, model,
                                              msg_id=msg_id)
                for status, _ in responses:
                    if consumer_gone.is_set():
                        # Leaving the `with` aborts the association: the PACS stops sending.
                        raise StreamClosed("the consumer stopped reading")
                    if status:
                        subops.update(status)
                    check_retrieve_status(conn.node, "C-MOVE", status, route.received,
                                          subops)
                total += subops
            received = route.received
        check_retrieve_outcome(conn.node, "C-MOVE", received, total)
        logger.info("%s: C-MOVE delivered %d instances", conn.node.name, received)

    return InstanceStream(produce, name=f"c-move-{conn.node.name}")
