"""The `query` flow: search a server, one row per study (or series), shown as a table."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact

from adit_tasks.core import find
from adit_tasks.core.config import load_settings
from adit_tasks.tasks import connection, ensure_node_limits


@flow(name="query", flow_run_name="query-{source}")
def query_flow(
    source: str,
    patient_id: str = "",
    patient_name: str = "",
    birth_date: str = "",
    study_date: str = "",
    modality: str = "",
    accession: str = "",
    study_uid: str = "",
    level: Literal["study", "series"] = "study",
    limit: int = 0,
    nodes_file: str | None = None,
) -> list[dict[str, Any]]:
    """Query `source` (C-FIND) and return the studies or series found as rows."""
    settings = load_settings(nodes_file)
    ensure_node_limits(settings)
    query = build_query(patient_id, patient_name, birth_date, study_date, modality, accession,
                        study_uid, level, limit)
    rows = run_query(connection(settings, settings.server(source)), query)
    create_table_artifact(key="query-result", table=rows,
                          description=f"{len(rows)} {level} result(s) from {source}")
    return rows


def build_query(patient_id: str = "", patient_name: str = "", birth_date: str = "",
                study_date: str = "", modality: str = "", accession: str = "",
                study_uid: str = "", level: str = "study", limit: int = 0) -> find.Query:
    """A validated Query from user-facing fields (dates as YYYYMMDD or YYYY-MM-DD)."""
    return find.Query(
        level=find.Level(level.upper()),
        patient_id=patient_id,
        patient_name=patient_name,
        birth_date=find.parse_date_range(birth_date)[0] if birth_date else "",
        study_date=find.parse_date_range(study_date) if study_date else None,
        modality=modality,
        accession=accession,
        study_uid=study_uid,
        limit=limit,
    )


def run_query(conn: Any, query: find.Query) -> list[dict[str, Any]]:
    if query.level == find.Level.SERIES:
        return [find.as_row(s) for s in find.find_series(conn, query)]
    return [find.as_row(s) for s in find.find_studies(conn, query)]
