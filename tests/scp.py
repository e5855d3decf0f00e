"""A small in-process pynetdicom SCP for tests, with misbehaviours to choose from.

`MisbehavingSCP(datasets, **options)` serves Verification, Study Root C-FIND/C-GET/C-MOVE and
CT/MR storage on a free loopback port, holding `datasets` in memory. Options:

* ``reject``: ``"permanent"`` (calling AE not recognised) or ``"transient"`` (local limit
  exceeded) rejects every association.
* ``abort_after=N``: a C-GET aborts the association after N C-STORE sub-operations.
* ``stall_seconds``: C-FIND and C-GET sleep this long before answering.
* ``fail_subops=N``: a C-GET/C-MOVE skips the last N instances and ends with 0xB000 and
  NumberOfFailedSuboperations N.
* ``busy``: C-FIND and C-GET answer 0xA700 (out of resources).
* ``delay_per_instance``: seconds to wait before each C-STORE sub-operation.
* ``move_destinations``: {AE title: (host, port)} for C-MOVE.
* ``omit_move_originator``: C-MOVE sub-operations carry no Move Originator Message ID.
* ``hold``: a `threading.Event`; C-GET/C-MOVE send nothing until it is set (`move_requested`
  is set as soon as a C-MOVE request arrived), so a test can act while a retrieval is pending.
* ``storage_classes``: the storage SOP classes served (default CT and MR Image).
* ``list_sop_classes=False``: image-level C-FIND answers leave out SOPClassUID (as dcmqrscp).
* ``store_status`` / ``store_comment``: the status (and ErrorComment) every C-STORE to this
  SCP is answered with, e.g. 0xA900 to refuse everything.

Sub-operations send each data set in the transfer syntax of its file meta when a context in
that syntax was accepted, else (pynetdicom) re-encoded into an accepted uncompressed one: an
SCP that converts what it stores when the peer did not offer the stored syntax.

The SCP always counts associations: `max_concurrent` is the largest number that were
established at the same time, `aborted` how many ended in an A-ABORT.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Self

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from adit_tasks.lab.servers import free_port

LOOPBACK = "127.0.0.1"
_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `condition` until it is true; False when that takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class _SCPAE(AE):
    """An AE whose C-MOVE sub-associations can leave out the Move Originator Message ID."""

    omit_move_originator = False

    def associate(self, *args: Any, **kwargs: Any) -> Any:
        assoc = super().associate(*args, **kwargs)
        if self.omit_move_originator:
            send = assoc.send_c_store

            def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2,
                             originator_aet: str | None = None,
                             originator_id: int | None = None) -> Dataset:
                return send(dataset, msg_id=msg_id, priority=priority)

            assoc.send_c_store = send_c_store  # type: ignore[method-assign]
        return assoc


class MisbehavingSCP:
    """An in-process DICOM server for tests (see the module docstring)."""

    def __init__(
        self,
        datasets: Sequence[Dataset] = (),
        *,
        ae_title: str = "MISBEHAVE",
        reject: Literal["permanent", "transient"] | None = None,
        abort_after: int | None = None,
        stall_seconds: float = 0.0,
        fail_subops: int = 0,
        busy: bool = False,
        delay_per_instance: float = 0.0,
        move_destinations: Mapping[str, tuple[str, int]] | None = None,
        omit_move_originator: bool = False,
        hold: threading.Event | None = None,
        storage_classes: Sequence[str] = (CTImageStorage, MRImageStorage),
        list_sop_classes: bool = True,
        store_status: int = 0x0000,
        store_comment: str = "",
    ) -> None:
        self.datasets = list(datasets)
        self.ae_title = ae_title
        self.reject = reject
        self.abort_after = abort_after
        self.stall_seconds = stall_seconds
        self.fail_subops = fail_subops
        self.busy = busy
        self.delay_per_instance = delay_per_instance
        self.move_destinations = dict(move_destinations or {})
        self.omit_move_originator = omit_move_originator
        self.hold = hold
        self.move_requested = threading.Event()
        self.storage_classes = list(storage_classes)
        self.list_sop_classes = list_sop_classes
        self.store_status = store_status
        self.store_comment = store_comment
        self.get_requests: list[Dataset] = []  # identifiers of the C-GET requests received
        self.port = 0
        self.stored: list[Dataset] = []  # what peers sent us by C-STORE
        self.sent: list[str] = []  # SOPInstanceUIDs of C-GET/C-MOVE sub-ops answered by the peer
        self.max_concurrent = 0
        self.established = 0
        self.aborted = 0
        self._open: set[int] = set()  # associations established and not yet closed
        self._live: set[int] = set()  # ... and not yet released or aborted (for `aborted`)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadedAssociationServer | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        ae = _SCPAE(ae_title=self.ae_title)
        ae.omit_move_originator = self.omit_move_originator
        ae.maximum_pdu_size = 0
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_supported_context(Verification, _SYNTAXES)
        for model in (StudyRootQueryRetrieveInformationModelFind,
                      StudyRootQueryRetrieveInformationModelGet,
                      StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(model, _SYNTAXES)
        for storage in self.storage_classes:
            # scu_role/scp_role: accept the peer's role selection for C-GET sub-operations
            ae.add_supported_context(storage, _SYNTAXES, scu_role=True, scp_role=True)
            ae.add_requested_context(storage, _SYNTAXES)  # for C-MOVE sub-associations
        if self.reject == "permanent":
            ae.require_calling_aet = ["NOBODY-KNOWN"]
        elif self.reject == "transient":
            # pynetdicom rejects (transient, local limit exceeded) when the number of
            # acceptor associations exceeds this; the public setter refuses values below 1.
            ae._maximum_associations = 0
        handlers = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_PDU_RECV, self._on_pdu),
        ]
        self.port = free_port()
        self._server = ae.start_server((LOOPBACK, self.port), block=False,
                                       evt_handlers=handlers)
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def open_associations(self) -> int:
        with self._lock:
            return len(self._open)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no association is open; False when that takes longer than `timeout`."""
        return wait_for(lambda: self.open_associations == 0, timeout)

    # --- association counting -----------------------------------------------------------------

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self._open.add(id(event.assoc))
            self._live.add(id(event.assoc))
            self.established += 1
            self.max_concurrent = max(self.max_concurrent, len(self._open))

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._open.discard(id(event.assoc))

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            self._open.discard(id(event.assoc))
            self._live.discard(id(event.assoc))

    def _on_aborted(self, event: evt.Event) -> None:
        # pynetdicom reports an abort only once the handler that was running returns, which
        # can be after the connection closed: count it by `_live`, not `_open`.
        with self._lock:
            if id(event.assoc) in self._live:
                self.aborted += 1
            self._open.discard(id(event.assoc))
            self._live.discard(id(event.assoc))

    def _on_pdu(self, event: evt.Event) -> None:
        # Count an association as closed as soon as the peer asks to release it, i.e. before
        # our A-RELEASE-RP lets the peer open its next association.
        if isinstance(getattr(event, "pdu", None), A_RELEASE_RQ):
            self._on_closed(event)

    # --- matching -----------------------------------------------------------------------------

    def _matches(self, identifier: Dataset) -> list[Dataset]:
        found = []
        for ds in self.datasets:
            ok = True
            for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                value = identifier.get(key, "") or ""
                # A UID list (list matching, PS3.4 C.2.2.2.2) matches any of its values.
                wanted = ([str(v) for v in value] if isinstance(value, MultiValue | list)
                          else [str(value)] if str(value) not in ("", "*") else [])
                if wanted and str(ds.get(key, "")) not in wanted:
                    ok = False
            if ok:
                found.append(ds)
        return found

    def _stall(self) -> None:
        if self.stall_seconds:
            self._stopping.wait(self.stall_seconds)

    # --- services -----------------------------------------------------------------------------

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        self._stall()
        if self.busy:
            yield 0xA700, None
            return
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "STUDY"))
        matches = self._matches(identifier)
        groups: dict[str, list[Dataset]] = {}
        group_key = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
                     "SERIES": "SeriesInstanceUID"}.get(level, "SOPInstanceUID")
        for ds in matches:
            groups.setdefault(str(ds.get(group_key, "")), []).append(ds)
        for members in groups.values():
            if event.is_cancelled:
                yield 0xFE00, None
                return
            first = members[0]
            result = Dataset()
            if "SpecificCharacterSet" in first:
                result.SpecificCharacterSet = first.SpecificCharacterSet
            result.QueryRetrieveLevel = level
            for elem in identifier:
                if elem.keyword == "SOPClassUID" and not self.list_sop_classes:
                    continue
                if elem.keyword in first and elem.keyword != "QueryRetrieveLevel":
                    result[elem.tag] = first[elem.tag]
                elif elem.keyword:
                    setattr(result, elem.keyword, elem.value)
            if "NumberOfStudyRelatedInstances" in identifier:
                result.NumberOfStudyRelatedInstances = len(members)
            if "NumberOfSeriesRelatedInstances" in identifier:
                result.NumberOfSeriesRelatedInstances = len(members)
            if "ModalitiesInStudy" in identifier:
                result.ModalitiesInStudy = sorted({str(m.Modality) for m in members})
            yield 0xFF00, result

    def _sub_operations(self, event: evt.Event, *, can_abort: bool
                        ) -> Iterator[Any]:
        """Yields the number of sub-operations, then (status, dataset) pairs."""
        matches = self._matches(event.identifier)
        if self.busy:
            yield max(len(matches), 1)
            yield 0xA700, None
            return
        yield len(matches)
        if self.hold is not None:
            self.hold.wait(30)
        to_send = matches[: max(len(matches) - self.fail_subops, 0)]
        for index, ds in enumerate(to_send):
            if can_abort and self.abort_after is not None and index >= self.abort_after:
                event.assoc.abort()
                return
            if event.is_cancelled:
                yield 0xFE00, None
                return
            if self.delay_per_instance:
                self._stopping.wait(self.delay_per_instance)
            yield 0xFF00, ds
            # Resumed: pynetdicom got the peer's C-STORE response to this instance.
            if event.assoc.is_established:
                with self._lock:
                    self.sent.append(str(ds.SOPInstanceUID))
        if len(to_send) < len(matches):
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = [str(ds.SOPInstanceUID)
                                               for ds in matches[len(to_send):]]
            # Warning: pynetdicom reports the remaining sub-operations as failed.
            yield 0xB000, failed

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        with self._lock:
            self.get_requests.append(event.identifier)
        self._stall()
        yield from self._sub_operations(event, can_abort=True)

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        self.move_requested.set()
        destination = self.move_destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None
            return
        yield destination
        yield from self._sub_operations(event, can_abort=False)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        if self.store_status:
            status = Dataset()
            status.Status = self.store_status
            if self.store_comment:
                status.ErrorComment = self.store_comment
            return status
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.stored.append(ds)
        return 0x0000
