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
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from adit_tasks.core.association import MAX_CONTEXTS, Connection
from adit_tasks.core.instances import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    UNCOMPRESSED,
    DicomInstance,
    InstanceStream,
    StreamClosed,
)
from adit_tasks.core.status import (
    SubOperations,
    check_retrieve_outcome,
    check_retrieve_status,
)

logger = logging.getLogger(__name__)



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
    compressed = [ts for ts in TRANSFER_SYNTAXES if ts not in UNCOMPRESSED]
    known = sorted(set(sop_classes or ()))
    if known and len(known) * (1 + len(compressed)) <= room:
        contexts = []
        for uid in known:
            contexts.append(build_context(uid, UNCOMPRESSED))
            contexts.extend(build_context(uid, ts) for ts in compressed)
        return contexts
    # A context with several syntaxes lets the PACS pick one it cannot convert to, so each
    # compressed syntax gets its own context, for the common classes only. Uncompressed
    # contexts come first: DCMTK uses the first accepted context of a SOP class.
    common = known + [c for c in _COMMON_CLASSES if c not in known]
    classes = common + [c for c in STORAGE_SOP_CLASSES if c not in common]
    contexts = [build_context(uid, UNCOMPRESSED) for uid in classes]
    compressed_room = max(0, room - len(contexts))
    extra = [build_context(uid, ts) for uid in common for ts in _COMMON_COMPRESSED]
    if compressed_room < len(extra):  # make room: drop the rarest uncompressed classes
        keep = room - min(len(extra), room // 2)
        contexts = contexts[:keep]
        compressed_room = room - keep
    return (contexts + extra[:compressed_room])[:room]


def retrieve_identifier(study_uid: str, series_uid: str = "") -> Dataset:
    """The C-GET/C-MOVE identifier of a study, or of one of its series."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    return ds


@dataclass(frozen=True)
class CGet:
    """Retrieval by C-GET over one association (see the module docstring)."""

    conn: Connection
    method: str = "c-get"

    def retrieve(self, study_uid: str, series_uids: tuple[str, ...] = (),
                 sop_classes: frozenset[str] = frozenset()) -> InstanceStream:
        return get_study(self.conn, study_uid, series_uids, sop_classes=sop_classes)


def get_study(
    conn: Connection,
    study_uid: str,
    series_uids: Iterable[str] = (),
    *,
    sop_classes: Iterable[str] | None = None,
) -> InstanceStream:
    """Stream the instances of a study (or of the given series) by C-GET."""
    series = list(series_uids)
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
                    check_retrieve_status(conn.node, "C-GET", status, received, subops)
                total += subops
        check_retrieve_outcome(conn.node, "C-GET", received, total)
        logger.info("%s: C-GET delivered %d instances", conn.node.name, received)

    return InstanceStream(produce, name=f"c-get-{conn.node.name}")
