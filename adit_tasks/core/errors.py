"""The exception hierarchy of ADIT.

Every failure the DICOM code raises is an `AditError`. Its class says whether trying again can
help: `RetriableError` (the PACS was busy, down, slow, or sent less than it promised) or
`PermanentError` (bad input, unknown study, unknown node: the same call will fail the same way).
Prefect tasks read this split in their `retry_condition_fn`; the CLI maps it to exit codes.
pynetdicom statuses are turned into these exceptions in exactly one place per operation.
"""

from __future__ import annotations


class AditError(Exception):
    """Base of every error ADIT raises on purpose."""


class RetriableError(AditError):
    """A failure that may go away on its own: trying again later makes sense."""


class PermanentError(AditError):
    """A failure that will repeat: retrying only loads the PACS."""


# --- retriable -------------------------------------------------------------------------------


class AssociationError(RetriableError):
    """The server could not be reached, or aborted the association."""


class DimseTimeout(RetriableError):
    """The server stopped answering within the configured timeout."""


class PacsBusy(RetriableError):
    """The server is alive but overloaded: 'out of resources', or a transient rejection."""


class IncompleteRetrieval(RetriableError):
    """Fewer instances arrived than the server promised or the query counted."""

    def __init__(self, message: str, *, expected: int, received: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.received = received


# --- permanent -------------------------------------------------------------------------------


class ConfigError(PermanentError):
    """The nodes file or settings are invalid."""


class UnknownNode(PermanentError):
    """A node name that the nodes file does not define."""


class NotSupported(PermanentError):
    """The node does not offer the operation asked for (for example C-MOVE on a C-GET-only PACS)."""


class InvalidInput(PermanentError, ValueError):
    """A request that can never succeed: invalid UID, bad date, malformed query. A ValueError
    too, so pydantic models that check user input report it as a validation error."""


class InvalidInstance(PermanentError):
    """An instance a peer sent fails the arrival checks (adit_tasks.core.instances)."""


class InvalidData(PermanentError):
    """A retrieval delivered instances that were put aside (their reasons, never values)."""


class DestinationUnwritable(PermanentError):
    """The destination folder cannot take the data: disk full, no permission, read-only."""


class StudyNotFound(PermanentError):
    """The server does not hold the study (or series) asked for."""


class AssociationRejected(PermanentError):
    """The server permanently rejected us, typically because it does not know our AE title."""


class DestinationRefused(PermanentError):
    """The destination refused instances for good: a C-STORE failure status other than 'out
    of resources' (0xA9xx, 0xCxxx, 0x0122, ...) or a SOP class / transfer syntax it does not
    accept. `reason` says why (status code and its meaning), never which instance."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class OperationFailed(PermanentError):
    """The server answered a DIMSE request with a failure status that retrying will not change."""


def is_retriable(exc: BaseException) -> bool:
    """True when a retry could help: ours when retriable, and network or OS errors (including
    httpx's transport errors, e.g. the Prefect server dropping a kept-alive connection)."""
    if isinstance(exc, AditError):
        return isinstance(exc, RetriableError)
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    import httpx

    return isinstance(exc, httpx.TransportError)
