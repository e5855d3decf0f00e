"""Prefect tasks: thin wrappers that add retries, per-node concurrency limits and safe names.

Every association holds a slot of the Prefect global concurrency limit named after its node
(`adit-node-<name>`, size `max_associations`). Limits live on the Prefect server, so they hold
across flows, runs, workers and machines. `ensure_node_limits()` creates them from the settings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectNotFound

from adit_tasks import find
from adit_tasks.archive import ArchiveWriter
from adit_tasks.association import Connection, local_slot
from adit_tasks.config import FolderNode, RetrieveMethod, ServerNode, Settings
from adit_tasks.errors import ConfigError, NotSupported, is_retriable
from adit_tasks.sinks import ArchiveSink, DicomWebSink, FolderSink, ServerSink, Sink
from adit_tasks.transfer import Pseudonymization, StudyOutcome, transfer_study
from adit_tasks.windows import OutsideWindow, TransferWindow

logger = logging.getLogger(__name__)


# Limits whose slot the current study already holds (see study_slots).
_held: ContextVar[frozenset[str]] = ContextVar("adit_held_slots", default=frozenset())


LEASE_SECONDS = 300.0  # a crashed holder's slot comes back after this; renewed while held
MAX_POLL_SECONDS = 2.0  # how long to wait between tries when the limit is full


@contextlib.contextmanager
def prefect_slot(node: ServerNode) -> Iterator[None]:
    """Hold one slot of the node's global concurrency limit while an association is open.

    Inside `study_slots` the study's slot is used instead of taking another: a study opens
    its associations to one node one after the other, so the limit still bounds the open
    associations, and a study costs two API calls per node instead of two per association.

    The slot is taken with the Prefect server's lease API directly: Prefect's `concurrency()`
    context manager costs about 2 s per acquisition inside a task run (measured here, 3.9.1),
    which for small studies was most of the transfer time.
    """
    if node.limit_name in _held.get():
        yield
        return
    with get_client(sync_client=True) as client:
        lease_id = _acquire(client, node.limit_name)
        stop = threading.Event()
        renewer = threading.Thread(target=_renew, args=(lease_id, stop), daemon=True,
                                   name=f"lease-{node.name}")
        renewer.start()
        token = _held.set(_held.get() | {node.limit_name})
        try:
            yield
        finally:
            _held.reset(token)
            stop.set()
            _release(client, lease_id)


def _acquire(client: Any, name: str) -> Any:
    """Take a slot of a concurrency limit with a lease; returns the lease ID."""
    body = {"names": [name], "slots": 1, "mode": "concurrency", "lease_duration": LEASE_SECONDS}
    return _take(client, "/v2/concurrency_limits/increment-with-lease", name, body)["lease_id"]


def _take(client: Any, path: str, name: str, body: dict[str, Any]) -> Any:
    """POST until the server grants the slot (423: wait as it says, at most MAX_POLL_SECONDS)."""
    while True:
        response = _post(client, path, body)
        if response.status_code == 423:
            time.sleep(min(float(response.headers.get("Retry-After", 1)), MAX_POLL_SECONDS))
            continue
        response.raise_for_status()
        data = response.json()
        limits = data.get("limits") if isinstance(data, dict) else data
        if not limits:
            raise ConfigError(f"Prefect limit '{name}' does not exist "
                              "(ensure_node_limits creates it when a flow starts)")
        return data


def _release(client: Any, lease_id: Any) -> None:
    response = _post(client, "/v2/concurrency_limits/decrement-with-lease",
                     {"lease_id": str(lease_id)})
    if response.status_code >= 400 and response.status_code != 404:
        logger.warning("could not release a concurrency lease (HTTP %s); it expires by itself",
                       response.status_code)


def _post(client: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST with quick retries of 503. On SQLite the server answers 503 (SQLITE_BUSY_SNAPSHOT)
    whenever another write lands between its read and its update, which is most of the time
    while tasks run; Prefect's client then waits 2 s per retry, which made a one-second study
    take three. Here the same request is sent again after a few milliseconds."""
    http = client._client  # Prefect's httpx client: base URL, auth headers
    for attempt in range(200):
        request = http.build_request("POST", path, json=body)
        try:
            response = httpx.Client.send(http, request)  # plain httpx send: no Prefect retries
        except httpx.TransportError:  # e.g. a kept-alive connection the server just closed
            if attempt >= 5:
                raise
            time.sleep(0.1)
            continue
        if response.status_code != 503:
            return response
        time.sleep(min(0.01 * (attempt + 1), 0.25))
    return response


def _renew(lease_id: Any, stop: threading.Event) -> None:
    with get_client(sync_client=True) as client:
        while not stop.wait(LEASE_SECONDS / 5):
            with contextlib.suppress(Exception):  # the next try, or lease expiry, settles it
                client.renew_concurrency_lease(lease_id, LEASE_SECONDS)


@contextlib.contextmanager
def study_slots(*nodes: ServerNode | None) -> Iterator[None]:
    """One slot of each node's limit for a whole study (see prefect_slot).

    Studies of this process queue on a local semaphore first: Prefect's limits are polled
    (a refused request waits a jittered Retry-After of up to 30 s), so only contention with
    other processes and machines should ever reach the server.
    """
    with contextlib.ExitStack() as stack:
        for node in nodes:
            if node is not None:
                stack.enter_context(local_slot(node))
                stack.enter_context(prefect_slot(node))
        yield


def ensure_node_limits(settings: Settings) -> None:
    """Create or resize the Prefect limits of every server node: one global concurrency limit
    (`max_associations`) and, where set, a rate limit (`studies_per_minute`)."""
    with get_client(sync_client=True) as client:
        for node in settings.servers:
            _ensure_limit(client, node.limit_name, node.max_associations, None)
            if node.studies_per_minute:
                # A slot per study, decaying at the allowed rate: bursts of at most
                # ceil(rate) studies, then one every 60/rate seconds.
                _ensure_limit(client, node.rate_limit_name,
                              max(1, math.ceil(node.studies_per_minute)),
                              node.studies_per_minute / 60.0)


def _ensure_limit(client: Any, name: str, limit: int, decay: float | None) -> None:
    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
            name=name, limit=limit, slot_decay_per_second=decay or 0.0))
        return
    if (existing.limit != limit or not existing.active
            or (decay or 0.0) != (existing.slot_decay_per_second or 0.0)):
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(
            limit=limit, active=True, slot_decay_per_second=decay or 0.0))


def window_gate(node: ServerNode, window: str = "", urgent: bool = False) -> None:
    """Raise OutsideWindow when the node's (or the run's) transfer window is closed.

    Called before a study (or a chunk of queries) starts, never in the middle of one: a study
    in flight when the window closes finishes; the next one waits.
    """
    if urgent:
        return
    gate = TransferWindow.parse(window or node.transfer_window)
    if not gate.is_open():
        raise OutsideWindow(node.name, gate.next_open())


@contextlib.contextmanager
def gentle(node: ServerNode) -> Iterator[None]:
    """The node's load limits around one study: rate limit before, pause after."""
    if node.studies_per_minute:
        with get_client(sync_client=True) as client:
            _take(client, "/v2/concurrency_limits/increment", node.rate_limit_name,
                  {"names": [node.rate_limit_name], "slots": 1, "mode": "rate_limit"})
    yield
    if node.pause_between_studies:
        time.sleep(node.pause_between_studies)


def connection(settings: Settings, node: ServerNode) -> Connection:
    return Connection(node=node, calling_ae=settings.ae_title, slot=prefect_slot)


def retry_if_retriable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures only (see adit_tasks.errors)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is None or is_retriable(exc)


def with_retries(task_obj: Any, settings: Settings) -> Any:
    """The task with the retry policy from the settings (exponential backoff)."""
    delay = settings.retry_delay_seconds
    return task_obj.with_options(
        retries=settings.retries,
        retry_delay_seconds=[delay * 2**i for i in range(settings.retries)] or 0,
        retry_condition_fn=retry_if_retriable,
    )


@task(name="echo")
def echo_task(settings: Settings, node_name: str) -> None:
    find.echo(connection(settings, settings.server(node_name)))


@task(name="find-studies")
def find_studies_task(settings: Settings, node_name: str, query: find.Query) -> list[find.Study]:
    return find.find_studies(connection(settings, settings.server(node_name)), query)


@task(name="transfer-study", cache_policy=NO_CACHE)
def transfer_study_task(
    settings: Settings,
    source: str,
    sink: Sink,
    study_uid: str,
    series_uids: tuple[str, ...] = (),
    pseudonymization: Pseudonymization | None = None,
    method: RetrieveMethod | None = None,
    window: str = "",
    urgent: bool = False,
) -> StudyOutcome:
    """Transfer one study; a Prefect task run per study, so retries and limits are per study.

    Runs in the flow's process (thread task runner): the sink may be shared (an archive).
    """
    node = settings.server(source)
    window_gate(node, window, urgent)
    destination = sink.conn.node if isinstance(sink, ServerSink | DicomWebSink) else None
    with gentle(node), study_slots(node, destination):
        return transfer_study(settings, connection(settings, node), sink, study_uid,
                              series_uids, pseudonymization=pseudonymization, method=method)


def make_sink(settings: Settings, destination: str, archive: ArchiveWriter | None = None) -> Sink:
    """The sink for a destination node: C-STORE or STOW-RS server, folder, or archive."""
    node = settings.node(destination)
    if isinstance(node, FolderNode):
        return ArchiveSink(archive) if archive else FolderSink(node.path)
    if archive:
        raise ConfigError(f"archives are written to folder nodes; '{destination}' is a server")
    if not node.store:
        raise NotSupported(f"node '{destination}' does not accept instances (store: false)")
    conn = connection(settings, node)
    return ServerSink(conn) if node.has_dimse else DicomWebSink(conn)
