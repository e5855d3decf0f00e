"""Prefect tasks: thin wrappers that add retries, per-node limits, windows and safe names.

Every association holds a slot of the Prefect global concurrency limit named after its node
(`adit-node-<name>`, size `max_associations`; see adit_tasks.leases). Limits live on the
Prefect server, so they hold across flows, runs, workers and machines. `ensure_node_limits()`
creates them from the settings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectNotFound

from adit_tasks.core import find
from adit_tasks.core.archive import ArchiveWriter
from adit_tasks.core.association import Connection
from adit_tasks.core.config import FolderNode, RetrieveMethod, ServerNode, Settings
from adit_tasks.core.errors import ConfigError, NotSupported, is_retriable
from adit_tasks.core.sinks import ArchiveSink, DicomWebSink, FolderSink, ServerSink, Sink
from adit_tasks.core.transfer import Pseudonymization, StudyOutcome, transfer_study
from adit_tasks.core.windows import OutsideWindow, TransferWindow
from adit_tasks.leases import node_slots, prefect_slot, take_rate_slot

logger = logging.getLogger(__name__)


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
        take_rate_slot(node)
    yield
    if node.pause_between_studies:
        time.sleep(node.pause_between_studies)


def connection(settings: Settings, node: ServerNode) -> Connection:
    return Connection(node=node, calling_ae=settings.ae_title, slot=prefect_slot)


def retry_if_retriable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures only (see adit_tasks.core.errors)."""
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
    with gentle(node), node_slots(node, destination):
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
