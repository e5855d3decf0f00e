"""One study from a source server to a destination (server or folder), counted and verified.

Plain Python: the Prefect task in `adit_tasks.tasks` adds retries, names and limits around it.
The steps are those of docs/architecture.md: resolve (image-level C-FIND gives the instances
to expect and their SOP classes), retrieve as a stream, sink, verify at the destination.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from adit_tasks.association import Connection
from adit_tasks.config import FolderNode, RetrieveMethod, ServerNode, Settings
from adit_tasks.errors import IncompleteRetrieval, StudyNotFound
from adit_tasks.find import manifest
from adit_tasks.folder import write_instances
from adit_tasks.retrieve import retrieve_study
from adit_tasks.store import StoreResult, store_instances

logger = logging.getLogger(__name__)

Status = Literal["success", "warning", "failure"]


@dataclass
class StudyOutcome:
    """The result row of one study."""

    status: Status
    expected: int
    transferred: int
    skipped: int = 0
    message: str = ""


def transfer_study(
    settings: Settings,
    source: Connection,
    destination: ServerNode | FolderNode,
    destination_conn: Connection | None,
    study_uid: str,
    series_uids: tuple[str, ...] = (),
    *,
    method: RetrieveMethod | None = None,
) -> StudyOutcome:
    """Move one study (or some of its series); raises on failure, returns the counts."""
    expected = manifest(source, study_uid, series_uids)
    if not expected:
        raise StudyNotFound(f"{source.node.name}: study not found (no instances listed)")
    stream = retrieve_study(settings, source, study_uid, series_uids, method=method,
                            sop_classes=expected.sop_classes)
    with stream:
        if isinstance(destination, FolderNode):
            result: StoreResult = write_instances(destination.path, stream)
        else:
            assert destination_conn is not None
            result = store_instances(destination_conn, stream)
    missing = set(expected.instances) - set(result.stored)
    if missing:
        raise IncompleteRetrieval(
            f"{len(missing)} of {len(expected)} instances did not arrive"
            + (f"; {len(result.failed)} refused by the destination" if result.failed else ""),
            expected=len(expected), received=len(expected) - len(missing),
        )
    if isinstance(destination, ServerNode) and destination_conn is not None:
        present = manifest(destination_conn, study_uid, series_uids)
        absent = set(expected.instances) - set(present.instances)
        if absent:
            raise IncompleteRetrieval(
                f"destination lists {len(expected) - len(absent)} of {len(expected)} instances",
                expected=len(expected), received=len(expected) - len(absent),
            )
    return StudyOutcome("success", expected=len(expected), transferred=len(result.stored))
