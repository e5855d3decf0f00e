"""Prefect tasks: thin wrappers that add retries, per-node slots, windows and pacing.

Each task holds one slot of each node it talks to for its whole duration (adit_tasks.limits);
the connections it gets were built with `slot_held_by_caller`, so they take nothing more,
except spare slots of the source that a retrieval takes for parallel associations while they
are free (`limits.spare_node_slot`, never waiting).
Retries follow the run's `RetryPolicy` and only for failures that may pass
(adit_tasks.core.errors). Tasks use NO_CACHE: no input (a plan holds a pseudonymizer) is
ever hashed or stored.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from adit_tasks.core import find
from adit_tasks.core.association import Connection
from adit_tasks.core.batch import BatchRow
from adit_tasks.core.batch_query import query_row
from adit_tasks.core.config import RetryPolicy
from adit_tasks.core.continuous import StudyFilter, wanted_studies
from adit_tasks.core.errors import is_retriable
from adit_tasks.core.plan import Gate, TransferPlan
from adit_tasks.core.results import StudyJob
from adit_tasks.core.transfer import StudyOutcome, transfer_study
from adit_tasks.limits import node_slots, take_rate_slot


def retry_if_retriable(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transient failures only (see adit_tasks.core.errors)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return exc is None or is_retriable(exc)


def with_retries(task_obj: Any, policy: RetryPolicy) -> Any:
    """The task with the run's retry policy (exponential backoff, transient failures only)."""
    return task_obj.with_options(retries=policy.retries,
                                 retry_delay_seconds=policy.delays() or 0,
                                 retry_condition_fn=retry_if_retriable)


@task(name="transfer-study", cache_policy=NO_CACHE)
def transfer_study_task(plan: TransferPlan, job: StudyJob) -> StudyOutcome:
    """Transfer one study: a task run per study, so retries and slots are per study.

    Runs in the flow's process (thread task runner): the plan's sink may be shared (an
    archive). A closed window raises OutsideWindow before anything is asked of the PACS.
    """
    plan.gate.check()
    node = plan.source.node
    if node.studies_per_minute:
        take_rate_slot(node)
    with node_slots(plan.nodes):
        outcome = transfer_study(plan, job)
    if node.pause_between_studies:
        time.sleep(node.pause_between_studies)
    return outcome


@task(name="find", cache_policy=NO_CACHE)
def find_task(conn: Connection, query: find.Query) -> list[find.Study] | list[find.Series]:
    """Studies or series (by the query's level) in one slot of the node."""
    with node_slots((conn.node,)):
        return find.find_at_level(conn, query)


@task(name="query-rows", cache_policy=NO_CACHE)
def query_rows_task(conn: Connection, gate: Gate, rows: list[BatchRow],
                    level: str) -> list[dict[str, Any]]:
    """Answer a chunk of batch rows in one slot (its queries run one after the other); each
    row's errors become its own 'failure' row."""
    gate.check()
    with node_slots((conn.node,)):
        return [result for row in rows for result in query_row(conn, row, level)]


@task(name="find-chunk", cache_policy=NO_CACHE)
def find_chunk_task(conn: Connection, gate: Gate, flt: StudyFilter, first: dt.date,
                    last: dt.date, find_limit: int = 0) -> list[StudyJob]:
    """A continuous job's chunk of days [first, last]: the studies its filter wants, with
    their wanted series, in one slot of the node (the chunk's queries run one after the
    other). `find_limit`: the most results the node returns for one C-FIND (0: unknown)."""
    gate.check()
    with node_slots((conn.node,)):
        return wanted_studies(conn, flt, first, last, find_limit or None)
