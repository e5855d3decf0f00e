"""The `continuous_transfer` flow: keep a destination in sync with a source for a cohort.

Meant to run from a deployment on a cron schedule. Each run:
1. retries the studies that failed in earlier runs (never silently dropped);
2. sweeps the history from where the last run stopped, oldest first, a chunk of days per
   C-FIND, until it reaches today, its study budget is used, or the transfer window closes;
   once the backlog is done it re-checks the last `overlap_days` every run, because studies
   arrive late and grow (a study that gained instances gets the missing ones);
   then re-checks `recheck_chunks` chunks of the history already swept, round-robin, so a
   study filed late under an old date is found too (within history/recheck_chunks runs);
3. saves its state after every chunk in the Prefect variable `adit_continuous_<job>`, so a
   crash or restart loses at most the chunk in flight, and re-doing it duplicates nothing
   (studies already at the destination are skipped);
4. reports what it did as a table artifact: found, transferred, already present, failed,
   postponed, and the backlog left.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.variables import Variable

from adit_tasks.core import windows
from adit_tasks.core.config import load_settings
from adit_tasks.core.continuous import (
    DATE,
    JobState,
    Pattern,
    StudyFilter,
    find_chunk,
    parse_day,
    wanted_series,
)
from adit_tasks.core.errors import ConfigError
from adit_tasks.core.windows import OutsideWindow
from adit_tasks.tasks import connection, ensure_node_limits, window_gate
from flows.options import TransferOptions
from flows.transfer import StudyJob, transfer_jobs


def state_variable(job: str) -> str:
    return "adit_continuous_" + re.sub(r"[^a-z0-9_]", "_", job.lower())


@flow(name="continuous-transfer", flow_run_name="continuous-{job}",
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def continuous_transfer_flow(
    job: str,
    source: str,
    destination: str,
    start_date: str,
    end_date: str = "",
    modality: str = "",
    study_description: str = "",
    series_description: str = "",
    institution_name: str = "",
    min_instances: int = 0,
    options: TransferOptions | None = None,
    chunk_days: int = 7,
    overlap_days: int = 3,
    max_studies_per_run: int = 500,
    find_limit: int = 0,
    recheck_chunks: int = 1,
    nodes_file: str | None = None,
) -> State:
    """Transfer every study of `source` that matches the filters to `destination`, past and
    future, a bit more each run. `job` names the job (its state); jobs with different filters
    and destinations run side by side under different names.

    Patterns (descriptions, institution) are DICOM wildcards (`*thorax*`) or case-insensitive
    regular expressions between slashes (`/thorax|chest/`). `find_limit`: the most results the
    source returns for one C-FIND (0: no limit known); fuller answers are split by date.
    """
    logger = get_run_logger()
    options = options or TransferOptions()
    settings = load_settings(nodes_file)
    node = settings.server(source)
    settings.node(destination)
    if chunk_days < 1 or overlap_days < 0:
        raise ConfigError("chunk_days must be at least 1 and overlap_days not negative")
    start = parse_day(start_date)
    end = parse_day(end_date) if end_date else None
    flt = StudyFilter(modality=modality, study_description=Pattern(study_description),
                      series_description=Pattern(series_description),
                      institution_name=Pattern(institution_name), min_instances=min_instances)
    ensure_node_limits(settings)
    key = state_variable(job)
    state = JobState.load(Variable.get(key, default=None), start)
    state.runs += 1
    today = windows.clock().date()
    horizon = min(end, today) if end else today
    report = {"found": 0, "transferred": 0, "already present": 0, "failed": 0,
              "postponed": 0, "retried": 0, "rechecked": 0}

    def save() -> None:
        Variable.set(key, state.dump(), overwrite=True)

    def run(jobs: list[StudyJob]) -> bool:
        """Transfer; record outcomes; False when the window closed (stop this run)."""
        rows = transfer_jobs(settings, source, destination, jobs, options,
                             continue_postponed=False) if jobs else []
        for row in rows:
            uid = row["StudyInstanceUID"]
            if row["status"] == "postponed":
                report["postponed"] += 1
            elif row["status"] == "failure":
                attempts = state.failed.get(uid, {}).get("attempts", 0) + 1
                state.failed[uid] = {"attempts": attempts, "message": row["message"][:200],
                                     "series": list(_series_of(jobs, uid))}
                report["failed"] += 1
            else:
                state.failed.pop(uid, None)
                if row.get("transferred"):
                    report["transferred"] += 1
                    state.transferred_total += 1
                else:
                    report["already present"] += 1
        return not any(r["status"] == "postponed" for r in rows)

    try:
        window_gate(node, options.window, options.urgent)
        conn = connection(settings, node)
        if state.failed:  # 1. earlier failures first
            retry = [StudyJob(uid, tuple(info.get("series") or ()), options.pseudonym)
                     for uid, info in state.failed.items()]
            report["retried"] = len(retry)
            if not run(retry):
                raise OutsideWindow(node.name, windows.clock())
            save()
        # 2. the sweep: from the cursor, or the overlap once the backlog is done
        cursor = parse_day(state.cursor)
        sweep_from = max(start, min(cursor, horizon - dt.timedelta(days=overlap_days)))
        budget = max_studies_per_run
        day = sweep_from
        while day <= horizon and budget > 0:
            window_gate(node, options.window, options.urgent)
            chunk_end = min(day + dt.timedelta(days=chunk_days - 1), horizon)
            studies = find_chunk(conn, flt, day, chunk_end, find_limit or None)
            jobs = []
            for study in studies:
                series = wanted_series(conn, flt, study)
                if series is not None:
                    jobs.append(StudyJob(study.StudyInstanceUID, series, options.pseudonym))
            report["found"] += len(jobs)
            if not run(jobs):
                break  # the window closed: this chunk is swept again next run
            budget -= len(jobs)
            day = chunk_end + dt.timedelta(days=1)
            state.cursor = max(state.cursor, day.strftime(DATE))
            save()
        # 3. the slow re-check of history already swept (behind the overlap)
        settled = min(parse_day(state.cursor), horizon - dt.timedelta(days=overlap_days))
        for _ in range(recheck_chunks if settled > start else 0):
            window_gate(node, options.window, options.urgent)
            first = parse_day(state.recheck) if state.recheck else start
            if first >= settled:
                first = start
            last = min(first + dt.timedelta(days=chunk_days - 1),
                       settled - dt.timedelta(days=1))
            jobs = [StudyJob(st.StudyInstanceUID, series, options.pseudonym)
                    for st in find_chunk(conn, flt, first, last, find_limit or None)
                    if (series := wanted_series(conn, flt, st)) is not None]
            report["rechecked"] += len(jobs)
            if not run(jobs):
                break
            state.recheck = (last + dt.timedelta(days=1)).strftime(DATE)
            save()
    except OutsideWindow as exc:
        logger.info("stopping: %s", exc)
    save()
    backlog = max(0, (horizon - parse_day(state.cursor)).days + 1)
    table = [{"measure": k, "value": v} for k, v in report.items()] + [
        {"measure": "swept up to", "value": state.cursor},
        {"measure": "backlog days left", "value": backlog},
        {"measure": "failed, to retry next run", "value": len(state.failed)},
        {"measure": "transferred by this job so far", "value": state.transferred_total}]
    create_table_artifact(key=f"continuous-{re.sub(r'[^a-z0-9-]', '-', job.lower())}",
                          table=table, description=f"continuous job {job}, run {state.runs}")
    summary = (f"found {report['found']}, transferred {report['transferred']}, "
               f"already present {report['already present']}, failed {report['failed']}, "
               f"backlog {backlog} days")
    result: dict[str, Any] = {**report, "backlog_days": backlog, "cursor": state.cursor,
                              "failed_total": len(state.failed)}
    if report["failed"]:
        return Failed(message=summary, data=result)
    return Completed(message=summary, data=result)


def _series_of(jobs: list[StudyJob], uid: str) -> tuple[str, ...]:
    return next((j.series_uids for j in jobs if j.study_uid == uid), ())
