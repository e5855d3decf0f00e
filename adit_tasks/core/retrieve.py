"""Retrieval by whichever method a node prefers: C-GET, C-MOVE or WADO-RS.

The node's `retrieve` list is its order of preference; a request may name one method instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from adit_tasks.core.association import Connection
from adit_tasks.core.config import RetrieveMethod, Settings
from adit_tasks.core.dicomweb import wado_study
from adit_tasks.core.errors import NotSupported
from adit_tasks.core.get import get_study
from adit_tasks.core.instances import InstanceStream
from adit_tasks.core.move import move_study
from adit_tasks.core.receiver import shared_receiver


def retrieve_study(
    settings: Settings,
    conn: Connection,
    study_uid: str,
    series_uids: Iterable[str] = (),
    *,
    method: RetrieveMethod | None = None,
    sop_classes: Iterable[str] | None = None,
) -> InstanceStream:
    """Stream a study (or some of its series) from `conn.node` by its preferred method."""
    node = conn.node
    if method is not None and method not in node.retrieve:
        raise NotSupported(f"node '{node.name}' does not list {method} in its retrieve methods")
    chosen = method or node.retrieve[0]
    if chosen == "c-get":
        return get_study(conn, study_uid, series_uids, sop_classes=sop_classes)
    if chosen == "c-move":
        receiver = shared_receiver(settings.ae_title, settings.receiver_host,
                                   settings.receiver_port)
        return move_study(conn, receiver, study_uid, series_uids)
    return wado_study(node, study_uid, series_uids, slot=conn.slot)
