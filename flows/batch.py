"""The batch flows: `batch_query` and `batch_transfer`, driven by a CSV/Excel file.

The batch is a path to a .csv/.xlsx file or CSV text pasted into the Prefect UI's form. Every
row is validated before any DICOM work starts; an invalid file fails the run with every
problem listed by row and column, and nothing is done. Results have one row per input row
(a query may add rows: one per study or series found) and go to `out` as .csv or .xlsx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import deployment
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.core.batch_file import BatchRow, read_batch_file, write_results
from adit_tasks.core.batch_query import query_row
from adit_tasks.core.config import RetrieveMethod, Settings, load_settings
from adit_tasks.core.windows import OutsideWindow, sleep_until
from adit_tasks.leases import node_slots
from adit_tasks.tasks import connection, ensure_node_limits, window_gate, with_retries
from flows.options import TransferOptions
from flows.transfer import Progress, StudyJob, schedule_again, transfer_jobs

ROWS_PER_TASK = 50  # a task run per chunk keeps orchestration small against the work


@task(name="query-rows", cache_policy=NO_CACHE)
def query_rows_task(settings: Settings, source: str, rows: list[BatchRow], level: str,
                    window: str = "", urgent: bool = False) -> list[dict[str, Any]]:
    """Answer a chunk of batch rows; each row's errors become its own 'failure' row."""
    node = settings.server(source)
    window_gate(node, window, urgent)
    conn = connection(settings, node)
    with node_slots(node):  # one slot for the chunk: its queries run one after the other
        return [result for row in rows for result in query_row(conn, row, level)]


@flow(name="batch-query", flow_run_name="batch-query-{source}",
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def batch_query_flow(
    batch: str,
    source: str,
    out: str = "",
    level: Literal["study", "series"] = "study",
    window: str = "",
    urgent: bool = False,
    nodes_file: str | None = None,
) -> State:
    """Look up every row of `batch` (a .csv/.xlsx path, or pasted CSV) on `source`.

    Rows need PatientID, or PatientName + PatientBirthDate, or AccessionNumber, or
    StudyInstanceUID; From/Until, Modality, StudyDescription narrow the search,
    SeriesDescription/SeriesNumber (or level=series) list series. Results go to `out`.
    Queries run inside the source's transfer window (or `window`) unless `urgent`.
    """
    settings = load_settings(nodes_file)
    settings.server(source)
    rows = read_batch_file(_batch_source(batch), "query")
    ensure_node_limits(settings)
    task_ = with_retries(query_rows_task, settings)
    chunks = [rows[i:i + ROWS_PER_TASK] for i in range(0, len(rows), ROWS_PER_TASK)]
    progress = Progress("batch rows answered")
    answers: dict[int, list[dict[str, Any]]] = {}
    pending = list(range(len(chunks)))
    while pending:
        futures = [task_.with_options(
            task_run_name=f"rows-{chunks[i][0].row}-{chunks[i][-1].row}").submit(
            settings, source, chunks[i], level, window, urgent) for i in pending]
        postponed, opens = [], None
        for i, future in zip(pending, futures, strict=True):
            future.wait()
            answer = future.state.result(raise_on_failure=False)
            if isinstance(answer, OutsideWindow):
                postponed.append(i)
                opens = min(opens or answer.opens, answer.opens)
                continue
            if isinstance(answer, BaseException):
                answer = [{"Row": r.row, "Status": "failure", "Message": str(answer),
                           "Pseudonym": r.pseudonym} for r in chunks[i]]
            answers[i] = answer
            progress.update(len(answers), len(chunks))
            _notify(len(answers) * ROWS_PER_TASK, len(rows))
        if postponed and deployment.id:
            for i in postponed:  # a new run at the opening time answers everything again
                answers[i] = [{"Row": r.row, "Status": "postponed", "Pseudonym": r.pseudonym,
                               "Message": f"outside the transfer window; opens {opens}"}
                              for r in chunks[i]]
            schedule_again(deployment.id, opens)
            break
        if postponed:
            sleep_until(opens)
        pending = postponed
    results = [row for i in range(len(chunks)) for row in answers[i]]
    return _publish(results, out, "batch-query-result", "rows",
                    ["Row", "Status", "Message", "StudyDate", "ModalitiesInStudy",
                     "NumberOfStudyRelatedInstances"])


@flow(name="batch-transfer", flow_run_name="batch-transfer-{source}-to-{destination}",
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def batch_transfer_flow(
    batch: str,
    source: str,
    destination: str,
    options: TransferOptions | None = None,
    out: str = "",
    method: RetrieveMethod | None = None,
    nodes_file: str | None = None,
) -> State:
    """Transfer the studies listed in `batch` (a .csv/.xlsx path, or pasted CSV).

    Rows need PatientID and StudyInstanceUID; SeriesInstanceUID limits a row to a series,
    Pseudonym names the patient when pseudonymizing. Rows of one study become one transfer.
    A batch query's result file can be used as it is (rows it found nothing for are skipped).
    """
    options = options or TransferOptions()
    settings = load_settings(nodes_file)
    rows = read_batch_file(_batch_source(batch), "transfer")
    wanted = [r for r in rows if not r.query_status]
    jobs, job_of_row = _jobs(wanted, options)
    by_study = transfer_jobs(settings, source, destination, jobs, options, method) if jobs else []
    results = []
    for row in rows:
        result: dict[str, Any] = {"Row": row.row, "PatientID": row.patient_id,
                                  "StudyInstanceUID": row.study_uid,
                                  "SeriesInstanceUID": row.series_uid,
                                  "Pseudonym": row.pseudonym}
        if row.query_status:
            result |= {"Status": "skipped", "Instances": 0,
                       "Message": f"the batch query said: {row.query_status}"}
        else:
            study = by_study[job_of_row[row.row]]
            result |= {"Status": study["status"], "Instances": study.get("transferred", 0),
                       "Message": study.get("message", ""),
                       "Pseudonym": study.get("pseudonym") or row.pseudonym,
                       "DestinationStudyInstanceUID": study.get("destination_study_uid", "")}
        results.append(result)
    public = ["Row", "Status", "Instances", "Message"] + (
        ["Pseudonym", "DestinationStudyInstanceUID"] if options.pseudonymizing
        else ["PatientID", "StudyInstanceUID"])
    return _publish(results, out, "batch-transfer-result", "rows", public)


def _jobs(rows: list[BatchRow], options: TransferOptions) -> tuple[list[StudyJob], dict]:
    """One job per study: its rows' series merged (a row without series means all of it)."""
    order: list[str] = []
    series: dict[str, set[str] | None] = {}
    pseudonym: dict[str, str] = {}
    job_of_row: dict[int, int] = {}
    for row in rows:
        uid = row.study_uid
        if uid not in series:
            order.append(uid)
            series[uid] = set()
        if not row.series_uid:
            series[uid] = None  # the whole study
        elif series[uid] is not None:
            series[uid].add(row.series_uid)  # type: ignore[union-attr]
        pseudonym.setdefault(uid, row.pseudonym or options.pseudonym)
        job_of_row[row.row] = order.index(uid)
    jobs = [StudyJob(uid, tuple(sorted(series[uid] or ())), pseudonym[uid]) for uid in order]
    return jobs, job_of_row


def _batch_source(batch: str) -> str | Path:
    """Pasted CSV text stays text; anything else is a path."""
    return batch if "\n" in batch or "\r" in batch else Path(batch)


def _notify(done: int, total: int) -> None:
    from flows import transfer

    if transfer.progress_listener:
        transfer.progress_listener(min(done, total), total)


def _publish(results: list[dict[str, Any]], out: str, key: str, what: str,
             public_columns: list[str]) -> State:
    """Write the result file, show a table artifact with the non-identifying columns."""
    logger = get_run_logger()
    if out:
        write_results(results, Path(out))
        logger.info("results written to %s", out)
    table = [{c: r.get(c, "") for c in public_columns} for r in results]
    failed = sum(r.get("Status") == "failure" for r in results)
    create_table_artifact(key=key, table=table,
                          description=f"{len(results)} {what}, {failed} failed")
    if failed:
        return Failed(message=f"{failed} of {len(results)} {what} failed", data=results)
    return Completed(message=f"{len(results)} {what}", data=results)

