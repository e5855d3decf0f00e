"""Our storage SCP for C-MOVE: one per job, shared by every C-MOVE the job runs.

A C-MOVE asks the PACS to send the instances to our AE title on another association. Each
waiting retrieval registers a route under the Message ID of its C-MOVE request, together with
the node the C-MOVE went to. The receiver is open to whoever can reach its port, so it takes an
instance only when all of these hold (PS3.7 9.3.1.1, PS3.4 C.4.2.3):

- the association's calling AE title is the AE title of a node with a pending C-MOVE (its
  `move_sender_ae_title` if the PACS sends under another AE title than it answers to; checked
  when the association is requested: other AE titles are rejected, "calling AE title not
  recognised");
- it comes from an address of that node (`move_sender_addresses`, default: the address its
  `host` resolves to; ["any"] skips this check for PACS behind NAT or in a cluster);
- its Move Originator Message ID names a pending C-MOVE sent to that node, and the instance
  belongs to the study (and series) that C-MOVE asked for. A PACS that leaves the ID out is
  matched by Study/Series Instance UID, but only among the C-MOVEs sent to the node the
  association comes from.

Everything else is refused with 0x0124 (Refused: Not Authorised) and logged with the calling AE
title, the address and the reason, never with a UID or a name. An instance from the right
sender that fails the arrival checks (`DicomInstance.from_bytes`) is handed to its retrieval as
`Rejected`, so the retrieval reports it instead of asking the PACS again.

Whoever runs the work opens the receiver (`open_receiver`) and stops it when the job ends. Every
job that runs C-MOVEs at the same time on one machine needs its own port and an AE title the
PACS knows; several workers on one machine therefore need different `receiver_port`s (or use
C-GET / WADO-RS).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pynetdicom import AE, Association, evt
from pynetdicom.transport import ThreadedAssociationServer

from adit_tasks.core.association import tune_for_throughput
from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import AssociationError, InvalidInstance
from adit_tasks.core.instances import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    DicomInstance,
    Rejected,
    StreamClosed,
)

logger = logging.getLogger(__name__)

REFUSED_NOT_AUTHORISED = 0x0124  # Refused: Not Authorised (PS3.7 C.5.26)
_FAILURE_CLOSED = 0xA700  # out of resources: the waiting retrieval went away
# Longer than the 16 characters of an AE title in an A-ASSOCIATE-RQ: matches no calling AE.
_NOBODY = "no C-MOVE pending"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Sender:
    """Who may send a C-MOVE's instances: the node's AE title, from its addresses."""

    node: str
    ae_title: str
    networks: tuple[Network, ...] | None  # None: any address

    @classmethod
    def of(cls, node: ServerNode) -> Sender:
        if not node.ae_title or not node.host:
            raise AssociationError(f"node '{node.name}' has no DIMSE address")
        ae_title = node.move_sender_ae_title or node.ae_title
        if node.move_sender_addresses == ["any"]:
            return cls(node.name, ae_title, None)
        entries = list(node.move_sender_addresses)
        if not entries:
            try:
                infos = socket.getaddrinfo(node.host, None, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise AssociationError(f"{node.name}: cannot resolve its host ({exc})") from exc
            entries = sorted({str(info[4][0]) for info in infos})
        networks = []
        for entry in entries:
            address = _address(entry)
            networks.append(ipaddress.ip_network(address) if address is not None
                            else ipaddress.ip_network(entry, strict=False))
        return cls(node.name, ae_title, tuple(networks))

    def refusal(self, calling_ae: str, address: str) -> str:
        """Why an association of `calling_ae` from `address` may not send for this node
        ('' if it may)."""
        if calling_ae.strip() != self.ae_title:
            return f"its calling AE title is not the one of node '{self.node}'"
        if self.networks is None:
            return ""
        peer = _address(address)
        if peer is None or not any(peer in network for network in self.networks):
            return f"it does not come from an address of node '{self.node}'"
        return ""


@dataclass
class Route:
    study_uid: str
    series_uids: frozenset[str]
    put: Callable[[DicomInstance | Rejected], None]
    sender: Sender
    received: int = 0

    def wants(self, instance: DicomInstance) -> bool:
        return instance.study_uid == self.study_uid and (
            not self.series_uids or instance.series_uid in self.series_uids
        )


class _ReceiverAE(AE):
    """An AE whose required calling AE titles are those of nodes with a pending C-MOVE, read
    when each association is requested (pynetdicom reads `require_calling_aet` then)."""

    def __init__(self, ae_title: str, allowed: Callable[[], list[str]]) -> None:
        super().__init__(ae_title=ae_title)
        self._allowed = allowed

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        # An empty list would let everyone in: with no C-MOVE pending, nobody matches.
        return self._allowed() or [_NOBODY]


class Receiver:
    """A storage SCP that routes incoming instances to waiting C-MOVE retrievals."""

    def __init__(self, ae_title: str, host: str, port: int) -> None:
        self.ae_title, self.host, self.port = ae_title, host, port
        self._routes: dict[int, Route] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: ThreadedAssociationServer | None = None
        self._refusals: dict[int, Counter[str]] = {}  # by association

    def start(self) -> Receiver:
        ae = _ReceiverAE(self.ae_title, self._pending_senders)
        ae.maximum_pdu_size = 0
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 120
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.require_called_aet = True
        try:
            handlers = [(evt.EVT_C_STORE, self._on_store),
                        (evt.EVT_REQUESTED, lambda event: tune_for_throughput(event.assoc)),
                        (evt.EVT_REJECTED, self._on_rejected),
                        (evt.EVT_CONN_CLOSE, self._on_closed)]
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

    def _pending_senders(self) -> list[str]:
        with self._lock:
            return sorted({route.sender.ae_title for route in self._routes.values()})

    @contextlib.contextmanager
    def route(self, study_uid: str, series_uids: frozenset[str],
              put: Callable[[DicomInstance | Rejected], None],
              node: ServerNode) -> Iterator[tuple[int, Route]]:
        """Register a retrieval waiting for what a C-MOVE to `node` sends; yields the Message
        ID to use for that C-MOVE."""
        sender = Sender.of(node)
        with self._lock:
            msg_id = next(i for i in (next(self._ids) % 65535 + 1 for _ in range(65535))
                          if i not in self._routes)
            route = Route(study_uid, series_uids, put, sender)
            self._routes[msg_id] = route
        try:
            yield msg_id, route
        finally:
            with self._lock:
                del self._routes[msg_id]

    def _find_route(self, msg_id: int | None, calling_ae: str, address: str,
                    instance: DicomInstance | Rejected) -> tuple[Route | None, str]:
        """The route an instance is for, or None and why it is refused."""
        with self._lock:
            if msg_id is not None:
                route = self._routes.get(msg_id)
                if route is None:
                    return None, "its Move Originator Message ID names no pending C-MOVE"
                why = route.sender.refusal(calling_ae, address)
                if why:
                    return None, f"{why}, to which that C-MOVE was sent"
                if isinstance(instance, DicomInstance) and not route.wants(instance):
                    return None, "it belongs to another study or series than its C-MOVE"
                return route, ""
            # Fallback for PACS that omit the Move Originator Message ID.
            if isinstance(instance, Rejected):
                return None, "unreadable, and without Move Originator Message ID"
            senders = [r for r in self._routes.values()
                       if not r.sender.refusal(calling_ae, address)]
            candidates = [r for r in senders if r.wants(instance)]
        if not senders:
            return None, "no C-MOVE is pending for this AE title and address"
        if not candidates:
            return None, ("no Move Originator Message ID, and no C-MOVE pending from this "
                          "sender asked for its study")
        if len(candidates) > 1:
            logger.warning("C-MOVE receiver: an instance matches %d waiting retrievals; using "
                           "the first", len(candidates))
        return candidates[0], ""

    def _on_store(self, event: evt.Event) -> int:
        requestor = event.assoc.requestor
        instance: DicomInstance | Rejected
        try:
            instance = DicomInstance.from_bytes(event.encoded_dataset())
        except InvalidInstance as exc:
            instance = Rejected(str(exc))
        route, why = self._find_route(event.request.MoveOriginatorMessageID,
                                      requestor.ae_title, requestor.address, instance)
        if route is None:
            self._refused(event.assoc, why)
            return REFUSED_NOT_AUTHORISED
        try:
            route.put(instance)
        except StreamClosed:
            return _FAILURE_CLOSED
        route.received += 1
        return 0x0000

    # --- logging refusals: the sender and the reason, never what was sent -------------------

    def _refused(self, assoc: Association, reason: str) -> None:
        with self._lock:
            counts = self._refusals.setdefault(id(assoc), Counter())
            first = not counts
            counts[reason] += 1
        if first:
            logger.warning("C-MOVE receiver: refused an instance from AE %r at %s: %s",
                           assoc.requestor.ae_title, assoc.requestor.address, reason)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            counts = self._refusals.pop(id(event.assoc), None)
        if counts and sum(counts.values()) > 1:
            reasons = "; ".join(f"{reason} ({n})" for reason, n in counts.most_common())
            logger.warning("C-MOVE receiver: refused %d instances from AE %r at %s: %s",
                           sum(counts.values()), event.assoc.requestor.ae_title,
                           event.assoc.requestor.address, reasons)

    def _on_rejected(self, event: evt.Event) -> None:
        logger.warning("C-MOVE receiver: rejected an association from AE %r at %s: no C-MOVE "
                       "is pending for that AE title", event.assoc.requestor.ae_title,
                       event.assoc.requestor.address)


@contextlib.contextmanager
def open_receiver(ae_title: str, host: str, port: int) -> Iterator[Receiver]:
    """A receiver for the duration of a job: started here, stopped when the job ends."""
    receiver = Receiver(ae_title, host, port).start()
    try:
        yield receiver
    finally:
        receiver.stop()
