"""The one place where what a peer answers becomes an ADIT exception (or a success).

DIMSE statuses (PS3.7 Annex C and the service annexes of PS3.4), association rejections and
aborts, retrieval sub-operation counts, and DICOMweb HTTP statuses are all mapped here, so the
retriable/permanent split that drives retries (adit_tasks.core.errors) is decided once, the
way pynetdicom's `status.py` classifies status codes once.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import (
    AssociationError,
    AssociationRejected,
    DestinationRefused,
    DimseTimeout,
    IncompleteRetrieval,
    OperationFailed,
    PacsBusy,
    StudyNotFound,
)


def association_failure(node: ServerNode, assoc: Association) -> Exception:
    """Why an association was not established: rejected for good, for now, or no answer."""
    where = f"{node.name} ({node.ae_title}@{node.host}:{node.port})"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", None)
        reason = getattr(rsp, "diagnostic", None)
        reason_text = getattr(rsp, "reason_str", None) or f"reason {reason}"
        # result 0x01 is 'rejected permanent'; 0x02 'rejected transient' (e.g. too busy).
        if result == 0x01:
            return AssociationRejected(
                f"{where} rejected the association permanently: {reason_text}. "
                f"Check that the server knows our AE title and that its AE title is right."
            )
        return PacsBusy(f"{where} rejected the association for now: {reason_text}")
    # pynetdicom reports a refused TCP connection as an abort too: tell the two apart.
    try:
        socket.create_connection((node.host, node.port), timeout=2).close()
    except OSError as exc:
        return AssociationError(f"{where} did not answer ({exc.strerror or exc})")
    return AssociationError(f"{where} aborted the association during negotiation")


_BUSY = (range(0xA700, 0xA800), (0x0213,))  # out of resources; resource limitation
_UID_LIKE = re.compile(r"\d+(?:\.\d+){2,}")


def _busy(code: int) -> bool:
    return any(code in codes for codes in _BUSY)


def check_status(node: ServerNode, operation: str, status: Dataset | None) -> int:
    """The status code of a DIMSE response, or the matching exception for a failure.

    An empty status means pynetdicom gave up waiting (timeout) or the association was aborted.
    """
    if status is None or "Status" not in status:
        raise DimseTimeout(
            f"{node.name}: {operation} got no response (timeout or association aborted)"
        )
    code = int(status.Status)
    category = code_to_category(code)
    if category in ("Success", "Pending", "Warning", "Cancel"):
        return code
    # The server's ErrorComment is free text from the peer (it may name the patient): never
    # repeated in a message, which reaches logs and run states; the status code says why.
    # A7xx is 'Refused: out of resources' in every Q/R and storage service.
    if _busy(code):
        raise PacsBusy(f"{node.name}: {operation} refused, out of resources 0x{code:04X}")
    raise OperationFailed(f"{node.name}: {operation} failed with status 0x{code:04X}")


def store_refusal(code: int, status: Dataset) -> str:
    """Why a C-STORE was refused, as a reason without instance data: '0xA900 Data Set Does Not
    Match SOP Class' (the server's ErrorComment is free text from the peer and may name the
    patient: it is not repeated)."""
    description = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "failure"))[1] or "failure"
    return f"0x{code:04X} {description}"


def check_store_status(node: ServerNode, status: Dataset | None) -> int:
    """A C-STORE response: the success or warning code; PacsBusy for 'out of resources'
    (0xA7xx, 0x0213: retriable); DestinationRefused with the status code and its meaning
    for every other failure (0xA9xx, 0xCxxx, 0x0122 SOP class not supported, ...);
    DimseTimeout when no response came."""
    if status is None or "Status" not in status:
        raise DimseTimeout(f"{node.name}: C-STORE got no response (timeout or association "
                           "aborted)")
    code = int(status.Status)
    if code_to_category(code) in ("Success", "Warning"):
        return code
    reason = store_refusal(code, status)
    if _busy(code):
        raise PacsBusy(f"{node.name}: C-STORE refused, {reason}")
    raise DestinationRefused(f"{node.name}: C-STORE refused: {reason}", reason=reason)


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

    @property
    def offered(self) -> int:
        return self.completed + self.failed + self.warning

    def __add__(self, other: SubOperations) -> SubOperations:
        return SubOperations(self.completed + other.completed, self.failed + other.failed,
                             self.warning + other.warning)


def check_retrieve_status(node: ServerNode, operation: str, status: Dataset | None,
                          received: int, subops: SubOperations) -> int:
    """check_status, except that a failure before anything was offered means 'not found'.

    Orthanc answers a C-GET/C-MOVE of an unknown study with 0xC000 and no sub-operations.
    """
    try:
        return check_status(node, operation, status)
    except OperationFailed as exc:
        if received == 0 and subops.offered == 0:
            raise StudyNotFound(f"{node.name}: {operation} found nothing to send "
                                f"({exc})") from None
        raise


def check_retrieve_outcome(node: ServerNode, operation: str, received: int,
                           subops: SubOperations) -> None:
    """A finished retrieval's counts as success, StudyNotFound or IncompleteRetrieval."""
    if received == 0 and subops.offered == 0:
        raise StudyNotFound(f"{node.name}: {operation} found nothing for the requested study")
    if subops.failed or received < subops.completed + subops.warning:
        raise IncompleteRetrieval(
            f"{node.name}: {operation} delivered {received} of {subops.offered} instances "
            f"({subops.failed} sub-operations failed)",
            expected=subops.offered,
            received=received,
        )


def check_http_status(node: ServerNode, code: int, what: str) -> None:
    """A DICOMweb answer's HTTP status: 404 not found, 429/5xx busy or down, 4xx permanent."""
    if code < 400:
        return
    if code == 404:
        raise StudyNotFound(f"{node.name}: {what} not found (HTTP 404)")
    if code in (429, 502, 503, 504):
        raise PacsBusy(f"{node.name}: {what}: server busy (HTTP {code})")
    if code >= 500:
        raise AssociationError(f"{node.name}: {what}: server error (HTTP {code})")
    raise OperationFailed(f"{node.name}: {what}: HTTP {code}")
