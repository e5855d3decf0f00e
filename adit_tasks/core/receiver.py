"""Our storage SCP for C-MOVE: one per job, shared by every C-MOVE the job runs.

A C-MOVE asks the PACS to send the instances to our AE title on another association. Each
waiting retrieval registers a route under the Message ID of its C-MOVE request. PACS put that
ID into each C-STORE as Move Originator Message ID (PS3.7 9.3.1.1), and the receiver hands the
instance to the matching route. A PACS that leaves it out is matched by Study/Series Instance
UID instead. An instance that belongs to no waiting retrieval is refused, never kept.

Whoever runs the work opens the receiver (`open_receiver`) and stops it when the job ends. Every
job that runs C-MOVEs at the same time on one machine needs its own port and an AE title the
PACS knows; several workers on one machine therefore need different `receiver_port`s (or use
C-GET / WADO-RS).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from adit_tasks.core.association import tune_for_throughput
from adit_tasks.core.instances import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    DicomInstance,
    StreamClosed,
)

logger = logging.getLogger(__name__)

_FAILURE_NO_ROUTE = 0xA801  # "Refused: Move Destination unknown" is the closest meaning
_FAILURE_CLOSED = 0xA700  # out of resources: the waiting retrieval went away


@dataclass
class Route:
    study_uid: str
    series_uids: frozenset[str]
    put: Callable[[DicomInstance], None]
    received: int = 0

    def wants(self, instance: DicomInstance) -> bool:
        return instance.study_uid == self.study_uid and (
            not self.series_uids or instance.series_uid in self.series_uids
        )


class Receiver:
    """A storage SCP that routes incoming instances to waiting C-MOVE retrievals."""

    def __init__(self, ae_title: str, host: str, port: int) -> None:
        self.ae_title, self.host, self.port = ae_title, host, port
        self._routes: dict[int, Route] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> Receiver:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        try:
            handlers = [(evt.EVT_C_STORE, self._on_store),
                        (evt.EVT_REQUESTED, lambda event: tune_for_throughput(event.assoc))]
            self._server = ae.start_server((self.host, self.port), block=False,
                                           evt_handlers=handlers)
        except OSError as exc:
            raise OSError(
                f"C-MOVE receiver cannot listen on {self.host}:{self.port} ({exc}); "
                "is another ADIT process using receiver_port?"
            ) from exc
        logger.info("C-MOVE receiver %s listening on %s:%s", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @contextlib.contextmanager
    def route(self, study_uid: str, series_uids: frozenset[str],
              put: Callable[[DicomInstance], None]) -> Iterator[tuple[int, Route]]:
        """Register a waiting retrieval; yields the Message ID to use for its C-MOVE."""
        with self._lock:
            msg_id = next(i for i in (next(self._ids) % 65535 + 1 for _ in range(65535))
                          if i not in self._routes)
            route = Route(study_uid, series_uids, put)
            self._routes[msg_id] = route
        try:
            yield msg_id, route
        finally:
            with self._lock:
                del self._routes[msg_id]

    def _find_route(self, msg_id: int | None, instance: DicomInstance) -> Route | None:
        with self._lock:
            route = self._routes.get(msg_id) if msg_id is not None else None
            if route is not None and route.wants(instance):
                return route
            # Fallback for PACS that omit (or garble) the Move Originator Message ID.
            candidates = [r for r in self._routes.values() if r.wants(instance)]
        if len(candidates) > 1:
            logger.warning("instance matches %d waiting retrievals; using the first",
                           len(candidates))
        return candidates[0] if candidates else None

    def _on_store(self, event: evt.Event) -> int:
        instance = DicomInstance.from_bytes(event.encoded_dataset())
        route = self._find_route(event.request.MoveOriginatorMessageID, instance)
        if route is None:
            logger.warning("refused an instance that no waiting C-MOVE asked for (from %s)",
                           event.assoc.requestor.ae_title)
            return _FAILURE_NO_ROUTE
        try:
            route.put(instance)
        except StreamClosed:
            return _FAILURE_CLOSED
        route.received += 1
        return 0x0000


@contextlib.contextmanager
def open_receiver(ae_title: str, host: str, port: int) -> Iterator[Receiver]:
    """A receiver for the duration of a job: started here, stopped when the job ends."""
    receiver = Receiver(ae_title, host, port).start()
    try:
        yield receiver
    finally:
        receiver.stop()
