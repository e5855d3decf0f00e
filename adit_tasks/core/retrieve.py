"""One retrieval interface, three transports: C-GET, C-MOVE and WADO-RS.

Every `Retriever` turns a study (or some of its series) into a bounded stream of instances as
the PACS stores them (adit_tasks.core.instances). Which one a job uses is decided once, when
its plan is built: the method the request names, else the node's first preference. A node
whose nodes-file entry does not list `retrieve` prefers the fastest method it offers:
WADO-RS where it has a `dicomweb_url`, then C-GET, then C-MOVE (measured on the lab Orthanc,
150-instance CT: WADO-RS 0.45 s, C-GET 0.61 s, C-MOVE 0.80 s; config.ServerNode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from adit_tasks.core.association import Connection
from adit_tasks.core.config import RetrieveMethod, ServerNode
from adit_tasks.core.dicomweb import WadoRs
from adit_tasks.core.errors import ConfigError, NotSupported
from adit_tasks.core.get import CGet
from adit_tasks.core.instances import InstanceStream
from adit_tasks.core.move import CMove
from adit_tasks.core.receiver import Receiver


class Retriever(Protocol):
    """A study (or some of its series) as a stream of instances."""

    @property
    def method(self) -> str: ...

    def retrieve(self, study_uid: str, series_uids: tuple[str, ...] = (),
                 sop_classes: frozenset[str] = frozenset(),
                 instances: Mapping[str, str] | None = None) -> InstanceStream:
        """`sop_classes` and `instances` (SOP Instance UID -> series UID) are what the
        caller's image-level C-FIND listed, where it has them: they let a retriever plan its
        associations (get.py) and share a large study over parallel ones."""
        ...


def choose_method(node: ServerNode, method: RetrieveMethod | None) -> RetrieveMethod:
    """The method asked for (if the node offers it), else the node's first preference."""
    if method is not None and method not in node.retrieve:
        raise NotSupported(f"node '{node.name}' does not list {method} in its retrieve methods")
    return method or node.retrieve[0]


def make_retriever(conn: Connection, method: RetrieveMethod,
                   receiver: Receiver | None = None) -> Retriever:
    """The retriever for a chosen method; C-MOVE needs the job's receiver."""
    if method == "c-get":
        return CGet(conn)
    if method == "c-move":
        if receiver is None:
            raise ConfigError("C-MOVE needs a receiver (open_receiver) for the job")
        return CMove(conn, receiver)
    return WadoRs(conn)
