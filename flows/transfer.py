"""The `transfer` flow: studies (or selected series) from a source to a destination node.

One Prefect task run per study, so retries, concurrency limits and progress in the UI are per
study. Task runs are named by position (`study-3`), never by patient data.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.config import RetrieveMethod, load_settings
from adit_tasks.find import validate_uid
from adit_tasks.tasks import ensure_node_limits, transfer_study_task, with_retries


@flow(name="transfer", flow_run_name="transfer-{source}-to-{destination}",
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def transfer_flow(
    source: str,
    destination: str,
    studies: list[str],
    series: list[str] | None = None,
    method: RetrieveMethod | None = None,
    nodes_file: str | None = None,
) -> State:
    """Transfer `studies` (StudyInstanceUIDs) from `source` to `destination`.

    `series` (SeriesInstanceUIDs) limits the transfer to those series; they must belong to the
    single study given. Returns one result row per study.
    """
    logger = get_run_logger()
    settings = load_settings(nodes_file)
    settings.server(source)
    settings.node(destination)
    studies = [validate_uid(s, "StudyInstanceUID") for s in studies]
    series_uids = tuple(validate_uid(s, "SeriesInstanceUID") for s in series or ())
    if series_uids and len(studies) != 1:
        raise ValueError("series can only be selected when exactly one study is given")
    ensure_node_limits(settings)

    task = with_retries(transfer_study_task, settings)
    progress = create_progress_artifact(0.0, description="studies finished")
    futures = [
        task.with_options(task_run_name=f"study-{i}").submit(
            settings, source, destination, uid, series_uids, method)
        for i, uid in enumerate(studies, start=1)
    ]
    rows: list[dict[str, Any]] = []
    for i, (uid, future) in enumerate(zip(studies, futures, strict=True), start=1):
        future.wait()
        outcome = future.state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            row = {"study": i, "StudyInstanceUID": uid, "status": "failure", "expected": None,
                   "transferred": 0, "skipped": 0, "message": str(outcome)}
        else:
            row = {"study": i, "StudyInstanceUID": uid, "status": outcome.status,
                   "expected": outcome.expected, "transferred": outcome.transferred,
                   "skipped": outcome.skipped, "message": outcome.message}
        rows.append(row)
        update_progress_artifact(progress, 100.0 * i / len(studies))
    failed = sum(r["status"] == "failure" for r in rows)
    create_table_artifact(key="transfer-result", table=rows,
                          description=f"{len(rows) - failed} of {len(rows)} studies transferred")
    logger.info("%d of %d studies transferred", len(rows) - failed, len(rows))
    if failed:
        return Failed(message=f"{failed} of {len(rows)} studies failed", data=rows)
    return Completed(message=f"{len(rows)} studies transferred", data=rows)
