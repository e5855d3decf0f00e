"""The batch flows: `batch_query` and `batch_transfer`, driven by a CSV/Excel file.

The batch is a path to a .csv/.xlsx file or CSV text pasted into the Prefect UI's form. Every
row is validated before any DICOM work starts; an invalid file fails the run with every
problem listed by row and column, and nothing is done. Results have one row per input row
(a query may add rows: one per study or series found) and go to `out` as .csv or .xlsx
(`adit_tasks.core.tables`); the run's final state carries them as a list of dicts (in the
flow's process only: neither the flows nor their tasks let Prefect persist results) and is
Failed when any row failed.

What Prefect records (README, "Privacy"): the result table artifacts show the row number,
status, counts and message (and the StudyInstanceUID of a transfer that does not
pseudonymize, the pseudonym and the new UID of one that does), never a Patient ID, name,
birth date or accession number; problems of a bad file name cells by row, column and length.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from prefect import flow
from prefect.runtime import deployment
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.core.association import Connection, slot_held_by_caller
from adit_tasks.core.batch import BatchRow, read_batch_file
from adit_tasks.core.batch_query import result_row
from adit_tasks.core.config import RetrieveMethod, load_settings
from adit_tasks.core.notice import status_counts
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.plan import Gate
from adit_tasks.core.results import StudyJob, StudyResult
from adit_tasks.core.tables import check_table_path, write_table
from adit_tasks.core.windows import OutsideWindow
from adit_tasks.limits import ensure_node_limits
from adit_tasks.notify import Notifier, notified_if_raising, notifier_for, notify_end
from adit_tasks.runs import (
    Progress,
    publish_table,
    results_in_order,
    run_in_windows,
    run_task,
    schedule_again,
    transfer_jobs,
)
from adit_tasks.tasks import query_rows_task

ROWS_PER_TASK = 50  # a task run per chunk keeps orchestration small against the work

Result = dict[str, Any]


@flow(name="batch-query", flow_run_name="batch-query-{source}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), persist_result=False)
def batch_query_flow(
    batch: str,
    source: str,
    out: str = "",
    level: Literal["study", "series"] = "study",
    window: str = "",
    urgent: bool = False,
    nodes_file: str | None = None,
    notify: list[str] | None = None,
) -> State:
    """Look up every row of `batch` (a .csv/.xlsx path, or pasted CSV) on `source`.

    Rows need PatientID, or PatientName + PatientBirthDate, or AccessionNumber, or
    StudyInstanceUID; From/Until, Modality, StudyDescription narrow the search,
    SeriesDescription/SeriesNumber (or level=series) list series. Results go to `out`.
    Queries run inside the source's transfer window (or `window`) unless `urgent`.
    `notify`: e-mail addresses and http(s) webhook URLs told when the run ends.
    """
    settings = load_settings(nodes_file)
    notifier = notifier_for(settings, notify)
    with notified_if_raising(notifier, "batch query", unit="rows"):
        node = settings.server(source)
        if out:
            check_table_path(out)
        rows = read_batch_file(batch, "query")
        gate = Gate.of(node, window, urgent)
        conn = Connection(node, settings.ae_title, slot_held_by_caller)  # the task holds the slot
        ensure_node_limits([node])
        task = run_task(query_rows_task, settings.retry)
        chunks = [rows[i:i + ROWS_PER_TASK] for i in range(0, len(rows), ROWS_PER_TASK)]
        progress = Progress("batch rows answered")
        answered = 0

        def run_round(pending: list[list[BatchRow]]) -> list[list[Result] | OutsideWindow]:
            nonlocal answered
            calls = [(f"rows-{chunk[0].row}-{chunk[-1].row}", (conn, gate, chunk, level))
                     for chunk in pending]
            outcomes: list[list[Result] | OutsideWindow] = []
            for chunk, answer in zip(pending, results_in_order(task, calls), strict=True):
                if isinstance(answer, OutsideWindow):
                    outcomes.append(answer)
                    continue
                if isinstance(answer, BaseException):
                    answer = [result_row(r, level, "failure", str(answer)) for r in chunk]
                outcomes.append(answer)
                answered += len(chunk)
                progress.update(answered, len(rows))
            return outcomes

        done, postponed, opens = run_in_windows(chunks, run_round, can_wait=not deployment.id)
        later = _postponed_message(gate.node, opens) if postponed else ""
        results = [result for i, chunk in enumerate(chunks)
                   for result in (done[i] if i in done else
                                  [result_row(r, level, "postponed", later) for r in chunk])]
        return _finish(results, out, key="batch-query-result", public=[
            "Row", "Status", "Message", "StudyDate", "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances"], notifier=notifier, kind="batch query")


# More workers than a node's usual slots: the next studies' task runs start (Prefect's
# bookkeeping) while others hold the slots; the rest wait on the node's local slot, holding
# nothing. 200 tiny studies: ~19 s with 4 workers, ~15 s with 8 (README, "Performance").
@flow(name="batch-transfer", flow_run_name="batch-transfer-{source}-to-{destination}",
      task_runner=ThreadPoolTaskRunner(max_workers=8), persist_result=False)
def batch_transfer_flow(
    batch: str,
    source: str,
    destination: str,
    options: TransferOptions | None = None,
    out: str = "",
    method: RetrieveMethod | None = None,
    nodes_file: str | None = None,
    notify: list[str] | None = None,
) -> State:
    """Transfer the studies listed in `batch` (a .csv/.xlsx path, or pasted CSV).

    Rows need PatientID and StudyInstanceUID; SeriesInstanceUID limits a row to a series,
    Pseudonym names the patient when pseudonymizing. Rows of one study become one transfer.
    A batch query's result file can be used as it is (rows it found nothing for are skipped).
    `notify`: e-mail addresses and http(s) webhook URLs told when the run ends.
    """
    options = options or TransferOptions()
    settings = load_settings(nodes_file)
    notifier = notifier_for(settings, notify)
    with notified_if_raising(notifier, "batch transfer", unit="rows"):
        if out:
            check_table_path(out)
        rows = read_batch_file(batch, "transfer")
        jobs, job_of_row = _jobs([r for r in rows if not r.query_status], options)
        by_job = transfer_jobs(settings, source, destination, jobs, options, method) if jobs else []
        results = [_transfer_result(row, by_job[job_of_row[row.row]] if not row.query_status
                                    else None) for row in rows]
        public = ["Row", "Status", "Instances", "Message"] + (
            ["Pseudonym", "DestinationStudyInstanceUID"] if options.pseudonymizing
            else ["StudyInstanceUID"])
        return _finish(results, out, key="batch-transfer-result", public=public,
                       notifier=notifier, kind="batch transfer")


def _jobs(rows: list[BatchRow], options: TransferOptions) -> tuple[list[StudyJob],
                                                                  dict[int, int]]:
    """One job per study: its rows' series merged (a row without series means all of it);
    and the index of each row's job, by row number."""
    series: dict[str, set[str] | None] = {}  # insertion order: the jobs' order
    index: dict[str, int] = {}
    pseudonym: dict[str, str] = {}
    job_of_row: dict[int, int] = {}
    for row in rows:
        uid = row.study_uid
        if uid not in series:
            series[uid], index[uid] = set(), len(index)
        wanted = series[uid]
        if not row.series_uid:
            series[uid] = None  # the whole study
        elif wanted is not None:
            wanted.add(row.series_uid)
        pseudonym.setdefault(uid, row.pseudonym or options.pseudonym)
        job_of_row[row.row] = index[uid]
    jobs = [StudyJob(uid, tuple(sorted(s or ())), pseudonym[uid]) for uid, s in series.items()]
    return jobs, job_of_row


def _transfer_result(row: BatchRow, study: StudyResult | None) -> Result:
    """One batch transfer result row: the input row and its study's typed result (None: the
    batch query had found nothing for the row, which is skipped)."""
    if study is None:
        status, instances = "skipped", 0
        message, pseudonym, destination_uid = (
            f"the batch query said: {row.query_status}", row.pseudonym, "")
    else:
        status, instances = study.status, study.transferred
        message, pseudonym, destination_uid = (
            study.message, study.pseudonym or row.pseudonym, study.destination_study_uid)
    return {"Row": row.row, "PatientID": row.patient_id, "StudyInstanceUID": row.study_uid,
            "SeriesInstanceUID": row.series_uid, "Pseudonym": pseudonym, "Status": status,
            "Instances": instances, "Message": message,
            "DestinationStudyInstanceUID": destination_uid}


def _postponed_message(node: str, opens: dt.datetime | None) -> str:
    """Why rows were not answered, and when they will be (a deployment run schedules a new
    run for the opening, which answers the whole file again)."""
    if opens is None:  # run_in_windows always names the opening with postponed items
        return f"outside the transfer window of {node}"
    message = f"outside the transfer window of {node}; it opens at {opens:%Y-%m-%d %H:%M}"
    if deployment.id:
        message += f"; the file is answered again in run '{schedule_again(deployment.id, opens)}'"
    return message


def _finish(results: list[Result], out: str, *, key: str, public: list[str],
            notifier: Notifier, kind: str) -> State:
    """Write the result file, publish the table's non-identifying columns, tell the
    notifier's recipients and end the run: Failed when any row failed, the result rows as
    its data either way."""
    if out:
        write_table(results, out)
    counts = status_counts(result["Status"] for result in results)
    line = f"{len(results)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if out:
        line += f"; results written to {out}"
    publish_table([{c: r.get(c, "") for c in public} for r in results], key=key,
                  description=line)
    notify_end(notifier, kind, counts, unit="rows")
    failed = counts.get("failure", 0)
    if failed:
        return Failed(message=f"{failed} of {len(results)} rows failed", data=results)
    return Completed(message=line, data=results)
