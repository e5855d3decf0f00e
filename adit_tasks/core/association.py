"""Opening associations to a DICOM server, each inside a slot of the node's `max_associations`.

The slot comes from a `SlotFactory` given to the `Connection` by whoever builds it: plain
Python callers get a process-local semaphore (`local_slot`); the Prefect layer holds one slot
of each node per study on the Prefect server and builds its connections with
`slot_held_by_caller`. Failed associations become exceptions in adit_tasks.core.status.

Parallel associations (one study over several). A retrieval may open more associations than
its one slot, but only in *spare* slots: slots of the same limit that are free at that moment,
taken without waiting while the first one is held (`Connection.spare_connections`), and given
back when its parallel work ends. So the node's `max_associations` holds across all studies,
runs and machines exactly as before (a spare slot is a slot of the same limit: local
semaphore, and for the Prefect layer a lease on the node's global concurrency limit from the
`spare` factory, `limits.spare_node_slot`), a study never waits for a second slot (no
deadlock: it already has one, and needs no more to finish), and when the node is busy a
study simply runs on one association. Connections whose caller holds the slot
(`slot_held_by_caller`) get spare slots only from a `spare` factory that knows the caller's
limits; without one they get none.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from pynetdicom import AE, Association
from pynetdicom.presentation import PresentationContext

from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import AssociationRejected
from adit_tasks.core.status import association_failure

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1-255

SlotFactory = Callable[[ServerNode], AbstractContextManager[object]]
# One more slot of the node if one is free now (never waits); yields whether it was taken.
SpareSlotFactory = Callable[[ServerNode], AbstractContextManager[bool]]

# A documented cache: the process's semaphore per node and limit, so every connection of the
# process to a node shares one `max_associations` (the process-local limit).
_local_semaphores: dict[str, threading.BoundedSemaphore] = {}
_local_lock = threading.Lock()


def _local_semaphore(node: ServerNode) -> threading.BoundedSemaphore:
    with _local_lock:
        return _local_semaphores.setdefault(
            f"{node.limit_name}/{node.max_associations}",
            threading.BoundedSemaphore(node.max_associations),
        )


@contextlib.contextmanager
def local_slot(node: ServerNode) -> Iterator[None]:
    """A process-local `max_associations` slot, for callers without a Prefect server."""
    with _local_semaphore(node):
        yield


@contextlib.contextmanager
def try_local_slot(node: ServerNode) -> Iterator[bool]:
    """A spare process-local slot if one is free now (a SpareSlotFactory)."""
    sem = _local_semaphore(node)
    taken = sem.acquire(blocking=False)
    try:
        yield taken
    finally:
        if taken:
            sem.release()


@contextlib.contextmanager
def slot_held_by_caller(node: ServerNode) -> Iterator[None]:
    """For connections whose caller already holds the node's slot for the whole job."""
    yield


@dataclass(frozen=True)
class Connection:
    """How we reach one DIMSE server: who we are, who it is, and how associations are limited."""

    node: ServerNode
    calling_ae: str
    slot: SlotFactory = field(default=local_slot)
    # Spare slots for parallel associations (module docstring); None: local spare slots for
    # `local_slot` connections, none otherwise.
    spare: SpareSlotFactory | None = None

    @contextlib.contextmanager
    def spare_connections(self, wanted: int) -> Iterator[list[Connection]]:
        """Up to `wanted` more connections to the node, each in a spare slot taken now
        without waiting (possibly none), for as long as the block runs. Call it while holding
        this connection's own slot (an open association)."""
        spare = self.spare or (try_local_slot if self.slot is local_slot else None)
        with contextlib.ExitStack() as stack:
            taken = 0
            while spare is not None and taken < wanted and stack.enter_context(spare(self.node)):
                taken += 1
            yield [replace(self, slot=slot_held_by_caller, spare=_no_spare)] * taken

    @contextlib.contextmanager
    def associate(
        self,
        contexts: Sequence[PresentationContext],
        *,
        ext_neg: list | None = None,
        evt_handlers: list | None = None,
    ) -> Iterator[Association]:
        """An established association, released (or aborted on error) on exit."""
        node = self.node
        if not node.has_dimse:
            raise AssociationRejected(f"node '{node.name}' has no DIMSE address")
        with self.slot(node):
            ae = AE(ae_title=self.calling_ae)
            ae.acse_timeout = node.timeout
            ae.dimse_timeout = node.timeout
            ae.network_timeout = node.timeout
            ae.connection_timeout = min(node.timeout, 10.0)
            ae.maximum_pdu_size = 0  # unlimited: fewer PDUs, faster on loopback and LAN
            ae.requested_contexts = list(contexts)
            assoc = ae.associate(
                node.host,
                node.port,
                ae_title=node.ae_title,
                ext_neg=ext_neg,
                evt_handlers=evt_handlers,
            )
            if not assoc.is_established:
                failure = association_failure(node, assoc)
                logger.warning("%s: association refused or failed: %s", node.name,
                               type(failure).__name__)
                raise failure
            tune_for_throughput(assoc)
            logger.info("%s: association opened (%d of %d contexts accepted)", node.name,
                        len(assoc.accepted_contexts), len(contexts))
            try:
                yield assoc
            except BaseException as exc:
                logger.info("%s: association aborted (%s)", node.name, type(exc).__name__)
                assoc.abort()
                raise
            else:
                assoc.release()
                logger.info("%s: association released", node.name)


@contextlib.contextmanager
def _no_spare(node: ServerNode) -> Iterator[bool]:
    yield False


class SharedWork(Generic[T]):
    """Requests shared by parallel associations: each takes the next one until none is left,
    or until one of them failed (the others stop after the request they are on)."""

    def __init__(self, items: Iterable[T]) -> None:
        self._items = list(items)[::-1]
        self._lock = threading.Lock()
        self.failed = False

    def __iter__(self) -> Iterator[T]:
        while True:
            with self._lock:
                if self.failed or not self._items:
                    return
                item = self._items.pop()
            yield item


def run_shared(work: SharedWork, first: Callable[[], None],
               others: Sequence[Callable[[], None]], name: str) -> None:
    """`first` in this thread, each of `others` in a thread of its own (in a copy of the
    caller's context variables, like the stream's producer), all taking from `work`; the first
    error is raised once every one of them has ended."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            work.failed = True
            errors.append(exc)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(guarded, job),
                                name=f"{name}-{i}", daemon=True)
               for i, job in enumerate(others, 1)]
    for thread in threads:
        thread.start()
    guarded(first)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def tune_for_throughput(assoc: Association) -> None:
    """Lower pynetdicom's per-message latency: measured 0.64 s -> 0.41 s for a 150-instance
    C-GET on loopback (benchmarks/retrieve.py).

    TCP_NODELAY stops Nagle's algorithm from holding back our small DIMSE responses, and the
    DUL reactor polls every 0.1 ms instead of 1 ms (`_run_loop_delay` is private to pynetdicom;
    pinned to 3.x in pyproject.toml, and harmless if it disappears).
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = 0.0001
