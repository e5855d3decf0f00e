"""Prefect tasks: thin wrappers that add retries, per-node concurrency limits and safe names.

Every association holds a slot of the Prefect global concurrency limit named after its node
(`adit-node-<name>`, size `max_associations`). Limits live on the Prefect server, so they hold
across flows, runs, workers and machines. `ensure_node_limits()` creates them from the settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

from adit_tasks import find
from adit_tasks.association import Connection
from adit_tasks.config import RetrieveMethod, ServerNode, Settings
from adit_tasks.errors import is_retriable
from adit_tasks.transfer import StudyOutcome, transfer_study

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def prefect_slot(node: ServerNode) -> Iterator[None]:
    """Hold one slot of the node's global concurrency limit while an association is open."""
    with concurrency(node.limit_name, occupy=1, strict=True,
                     raise_on_lease_renewal_failure=False):
        yield


def ensure_node_limits(settings: Settings) -> None:
    """Create or resize one global concurrency limit per server node."""
    with get_client(sync_client=True) as client:
        for node in settings.servers:
            try:
                existing = client.read_global_concurrency_limit_by_name(node.limit_name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=node.limit_name,
                                                 limit=node.max_associations)
                )
                continue
            if existing.limit != node.max_associations or not existing.active:
                client.update_global_concurrency_limit(
                    node.limit_name,
                    GlobalConcurrencyLimitUpdate(limit=node.max_associations, active=True),
                )


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


@task(name="transfer-study")
def transfer_study_task(
    settings: Settings,
    source: str,
    destination: str,
    study_uid: str,
    series_uids: tuple[str, ...] = (),
    method: RetrieveMethod | None = None,
) -> StudyOutcome:
    """Transfer one study; a Prefect task run per study, so retries and limits are per study."""
    dest = settings.node(destination)
    dest_conn = connection(settings, dest) if isinstance(dest, ServerNode) else None
    return transfer_study(settings, connection(settings, settings.server(source)), dest,
                          dest_conn, study_uid, series_uids, method=method)
