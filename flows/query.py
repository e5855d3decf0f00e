"""The `query` flow: search a server, one row per study (or series), shown as a table.

The result table holds what the user searched for (names, IDs, birth dates): it is one of the
two places where patient data may appear in Prefect's records (README, "Privacy"; Prefect
copies an artifact into the event that announces it). The rows the flow returns stay in its
process: neither the flow nor its task lets Prefect persist them.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact

from adit_tasks.core import find
from adit_tasks.core.association import Connection, slot_held_by_caller
from adit_tasks.core.config import load_settings
from adit_tasks.core.options import StudySearch
from adit_tasks.limits import ensure_node_limits
from adit_tasks.runs import run_task
from adit_tasks.tasks import find_task


@flow(name="query", flow_run_name="query-{source}", persist_result=False)
def query_flow(
    source: str,
    search: StudySearch | None = None,
    level: Literal["study", "series"] = "study",
    limit: int = 0,
    nodes_file: str | None = None,
) -> list[dict[str, Any]]:
    """Query `source` (C-FIND) and return the studies or series found as rows."""
    settings = load_settings(nodes_file)
    node = settings.server(source)
    ensure_node_limits([node])
    query = (search or StudySearch()).query(level, limit)
    conn = Connection(node, settings.ae_title, slot_held_by_caller)
    found = run_task(find_task, settings.retry)(conn, query)
    rows = [find.as_row(r) for r in found]
    create_table_artifact(key="query-result", table=rows,
                          description=f"{len(rows)} {level} result(s) from {source}")
    return rows
