"""C-GET: retrieve a study or selected series over one association, as a stream of instances.

C-GET needs no inbound port, so it is the first choice where a PACS supports it.

Presentation contexts: when the study's SOP classes are known (from an image-level C-FIND),
each SOP class is offered with the uncompressed syntaxes in one context and every compressed
syntax in a context of its own. The PACS then finds a context in the exact syntax it stores and
sends the instance unchanged. (Orthanc picks the context in the stored syntax; DCMTK
`dcmqrscp` 3.6.7 uses the first accepted context of the SOP class and fails the sub-operation
when it cannot convert to it, so from dcmqrscp C-GET and C-MOVE deliver uncompressed
instances and report compressed ones as a shortfall.) When the SOP classes are unknown
(dcmqrscp returns no SOPClassUID at image level) we offer the common classes with the common
compressed syntaxes, and all other storage classes uncompressed, within the 128-context limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from adit_tasks.core.association import Connection, check_status
from adit_tasks.core.errors import IncompleteRetrieval, OperationFailed, StudyNotFound
from adit_tasks.core.find import validate_uid
from adit_tasks.core.instances import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    DicomInstance,
    InstanceStream,
    StreamClosed,
)

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


# Where the study's SOP classes are unknown, these get contexts of their own for the common
# compressed syntaxes; every other storage class is offered uncompressed only.
_COMMON_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray (presentation)
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography (presentation)
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
]
_COMMON_COMPRESSED = [
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
]


def storage_contexts(sop_classes: Iterable[str] | None, room: int) -> list:
    """Storage contexts for at most `room` contexts (see the module docstring)."""
    compressed = [ts for ts in TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED]
    known = sorted(set(sop_classes or ()))
    if known and len(known) * (1 + len(compressed)) <= room:
        contexts = []
        for uid in known:
            contexts.append(build_context(uid, _UNCOMPRESSED))
            contexts.extend(build_context(uid, ts) for ts in compressed)
        return contexts
    # A context with several syntaxes lets the PACS pick one it cannot convert to, so each
    # compressed syntax gets its own context, for the common classes only. Uncompressed
    # contexts come first: DCMTK uses the first accepted context of a SOP class.
    common = known + [c for c in _COMMON_CLASSES if c not in known]
    classes = common + [c for c in STORAGE_SOP_CLASSES if c not in common]
    contexts = [build_context(uid, _UNCOMPRESSED) for uid in classes]
    compressed_room = max(0, room - len(contexts))
    extra = [build_context(uid, ts) for uid in common for ts in _COMMON_COMPRESSED]
    if compressed_room < len(extra):  # make room: drop the rarest uncompressed classes
        keep = room - min(len(extra), room // 2)
        contexts = contexts[:keep]
        compressed_room = room - keep
    return (contexts + extra[:compressed_room])[:room]


@dataclass
class SubOperations:
    """The sub-operation counts of the last C-GET/C-MOVE response."""

    completed: int = 0
    failed: int = 0
    warning: int = 0

    def update(self, status: Dataset) -> None:
        self.completed = int(status.get("NumberOfCompletedSuboperations", self.completed) or 0)
        self.failed = int(status.get("NumberOfFailedSuboperations", self.failed) or 0)
        self.warning = int(status.get("NumberOfWarningSuboperations", self.warning) or 0)

    def __add__(self, other: SubOperations) -> SubOperations:
        return SubOperations(self.completed + other.completed, self.failed + other.failed,
                             self.warning + other.warning)


def retrieve_identifier(study_uid: str, series_uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    return ds


def check_retrieve_status(conn: Connection, operation: str, status: Dataset | None,
                          received: int, subops: SubOperations) -> int:
    """check_status, except that a failure before anything was offered means 'not found'.

    Orthanc answers a C-GET/C-MOVE of an unknown study with 0xC000 and no sub-operations.
    """
    try:
        return check_status(conn.node, operation, status)
    except OperationFailed as exc:
        if received == 0 and subops.completed + subops.failed + subops.warning == 0:
            raise StudyNotFound(f"{conn.node.name}: {operation} found nothing to send "
                                f"({exc})") from None
        raise


def check_outcome(conn: Connection, operation: str, study_uid: str, received: int,
                  subops: SubOperations) -> None:
    """Turn a finished retrieval's counts into success, StudyNotFound or IncompleteRetrieval."""
    offered = subops.completed + subops.failed + subops.warning
    if received == 0 and offered == 0:
        raise StudyNotFound(f"{conn.node.name}: {operation} found nothing for the requested study")
    if subops.failed or received < subops.completed + subops.warning:
        raise IncompleteRetrieval(
            f"{conn.node.name}: {operation} delivered {received} of {offered} instances "
            f"({subops.failed} sub-operations failed)",
            expected=offered,
            received=received,
        )


def get_study(
    conn: Connection,
    study_uid: str,
    series_uids: Iterable[str] = (),
    *,
    sop_classes: Iterable[str] | None = None,
) -> InstanceStream:
    """Stream the instances of a study (or of the given series) by C-GET."""
    study_uid = validate_uid(study_uid, "StudyInstanceUID")
    series = [validate_uid(s, "SeriesInstanceUID") for s in series_uids]
    model = StudyRootQueryRetrieveInformationModelGet
    contexts = [build_context(model), *storage_contexts(sop_classes, MAX_CONTEXTS - 1)]
    roles = [build_role(uid, scp_role=True)
             for uid in dict.fromkeys(cx.abstract_syntax for cx in contexts[1:])]

    def produce(put: Callable[[DicomInstance], None]) -> None:
        received = 0

        def on_store(event: evt.Event) -> int:
            nonlocal received
            instance = DicomInstance.from_bytes(event.encoded_dataset())
            try:
                put(instance)
            except StreamClosed:
                # The consumer is gone: stop the PACS sending more. Without the zero timeout
                # pynetdicom would wait a full DIMSE timeout for a message after the abort.
                event.assoc.dimse_timeout = 0
                event.assoc.abort()
                raise
            received += 1
            return 0x0000

        handlers = [(evt.EVT_C_STORE, on_store)]
        total = SubOperations()
        with conn.associate(contexts, ext_neg=roles, evt_handlers=handlers) as assoc:
            for series_uid in series or [""]:
                subops = SubOperations()
                identifier = retrieve_identifier(study_uid, series_uid)
                for status, _ in assoc.send_c_get(identifier, model):
                    if status:
                        subops.update(status)
                    check_retrieve_status(conn, "C-GET", status, received, subops)
                total += subops
        check_outcome(conn, "C-GET", study_uid, received, total)

    return InstanceStream(produce, name=f"c-get-{conn.node.name}")
