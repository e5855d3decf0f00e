"""The `transfer` flow: studies (or selected series) from a source to a destination node,
optionally pseudonymized, to a server, a folder, or an encrypted archive in a folder.

One Prefect task run per study, so retries, concurrency limits and progress in the UI are per
study. Task runs are named by position (`study-3`), never by patient data. Secrets (the
pseudonymization key, the archive password) come from the environment or Prefect Secret
blocks, never from flow parameters, which the Prefect server stores and shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import deployment, flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.core.archive import ArchiveWriter
from adit_tasks.core.config import RetrieveMethod, Settings, load_settings
from adit_tasks.core.errors import ConfigError
from adit_tasks.core.find import validate_uid
from adit_tasks.core.pseudonymize import Pseudonymizer
from adit_tasks.core.transfer import Pseudonymization
from adit_tasks.core.windows import OutsideWindow, sleep_until
from adit_tasks.tasks import ensure_node_limits, make_sink, transfer_study_task, with_retries
from flows.options import TransferOptions, make_pseudonymizer, open_archive

# Called with (finished, total) as studies finish; the CLI sets it to draw a progress bar.
progress_listener: Callable[[int, int], None] | None = None


class Progress:
    """A Prefect progress artifact, updated at most every few seconds (each update is an API
    call: 30-40 ms per study on a busy server) and at the end."""

    def __init__(self, description: str, every: float = 3.0) -> None:
        self._id = create_progress_artifact(0.0, description=description)
        self._every = every
        self._last = time.monotonic()

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last >= self._every:
            update_progress_artifact(self._id, 100.0 * done / max(total, 1))
            self._last = now


@dataclass(frozen=True)
class StudyJob:
    """One study to transfer: its UID, optional series, optional pseudonym."""

    study_uid: str
    series_uids: tuple[str, ...] = ()
    pseudonym: str = ""


@flow(name="transfer", flow_run_name="transfer-{source}-to-{destination}",
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def transfer_flow(
    source: str,
    destination: str,
    studies: list[str],
    series: list[str] | None = None,
    options: TransferOptions | None = None,
    method: RetrieveMethod | None = None,
    nodes_file: str | None = None,
) -> State:
    """Transfer `studies` (StudyInstanceUIDs) from `source` to `destination`.

    `series` (SeriesInstanceUIDs) limits the transfer to those series of the one study given.
    `options`: pseudonymization, trial and archive (see TransferOptions). The pseudonymization
    key comes from ADIT_PSEUDONYM_SECRET (or the Prefect Secret block `adit-pseudonym-secret`),
    the archive password from ADIT_ARCHIVE_PASSWORD (or `adit-archive-password`).
    Returns one result row per study.
    """
    options = options or TransferOptions()
    studies = [validate_uid(s, "StudyInstanceUID") for s in studies]
    series_uids = tuple(validate_uid(s, "SeriesInstanceUID") for s in series or ())
    if not studies:
        raise ConfigError("no studies given")
    if series_uids and len(studies) != 1:
        raise ConfigError("series can only be selected when exactly one study is given")
    jobs = [StudyJob(uid, series_uids, options.pseudonym) for uid in studies]
    rows = transfer_jobs(load_settings(nodes_file), source, destination, jobs, options, method)
    return finish(rows, options, "studies")


def transfer_jobs(settings: Settings, source: str, destination: str, jobs: list[StudyJob],
                  options: TransferOptions, method: RetrieveMethod | None = None, *,
                  continue_postponed: bool = True) -> list[dict[str, Any]]:
    """Transfer the jobs (one task run each) and return one result row per job, in order.

    Shared by every flow that moves studies. Validates nodes and secrets before any work.
    Studies that meet a closed transfer window are continued later (see _continue_postponed)
    unless `continue_postponed` is off (the continuous flow's next scheduled run does it).
    """
    logger = get_run_logger()
    source_node = settings.server(source)
    settings.node(destination)
    pseudonymizer = make_pseudonymizer(options, source_node)
    archive = open_archive(settings, destination, options,
                           [(j.study_uid, j.series_uids, j.pseudonym) for j in jobs])
    if isinstance(archive, str):
        return [{"study": i, "status": "success", "transferred": 0, "skipped": 0,
                 "message": f"archive {archive} is already complete"}
                for i in range(1, len(jobs) + 1)]
    sink = make_sink(settings, destination, archive)
    ensure_node_limits(settings)
    rows = run_jobs(settings, source, sink, jobs, pseudonymizer, method, options)
    if continue_postponed:
        rows = _continue_postponed(settings, source, sink, jobs, rows, pseudonymizer, method,
                                   options, archive is not None)
    if isinstance(archive, ArchiveWriter):
        if any(r["status"] in ("failure", "postponed") for r in rows):
            archive.abandon()
            logger.warning("archive not written: a study failed; a re-run starts it again")
        else:
            logger.info("archive written: %s", archive.finish().name)
    return rows


def _continue_postponed(settings: Settings, source: str, sink: Any, jobs: list[StudyJob],
                       rows: list[dict[str, Any]], pseudonymizer: Pseudonymizer | None,
                       method: RetrieveMethod | None, options: TransferOptions,
                       archive: bool) -> list[dict[str, Any]]:
    """Studies that met a closed transfer window continue when it opens.

    A deployment run schedules a copy of itself (same parameters) for the opening time and
    ends, so no worker slot is held for hours; re-running is safe because studies already at
    the destination are skipped. A run started by hand (CLI) waits in its process instead.
    An archive job is never continued half-way: its archive starts again in the new run.
    """
    logger = get_run_logger()
    while True:
        postponed = [i for i, r in enumerate(rows) if r["status"] == "postponed"]
        if not postponed:
            return rows
        opens = min(rows[i]["opens"] for i in postponed)
        deployment_id = deployment.id
        if deployment_id or archive:
            if deployment_id:
                later = schedule_again(deployment_id, opens)
                note = f"; continues in run '{later}' at {opens:%Y-%m-%d %H:%M}"
            else:
                note = "; the archive was not written: run the job again then"
            for i in postponed:
                rows[i]["message"] += note
            return rows
        logger.info("%d studies wait for the transfer window (opens %s)", len(postponed),
                    f"{opens:%Y-%m-%d %H:%M}")
        sleep_until(opens)
        again = run_jobs(settings, source, sink, [jobs[i] for i in postponed], pseudonymizer,
                         method, options)
        for i, row in zip(postponed, again, strict=True):
            rows[i] = row | {"study": rows[i]["study"]}


def schedule_again(deployment_id: Any, at: Any) -> str:
    """A new run of this deployment with this run's parameters, scheduled for `at`."""
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment_id, parameters=dict(flow_run.parameters),
            state=Scheduled(scheduled_time=at.astimezone()))
    return run.name


def run_jobs(settings: Settings, source: str, sink: Any, jobs: list[StudyJob],
             pseudonymizer: Pseudonymizer | None, method: RetrieveMethod | None,
             options: TransferOptions | None = None) -> list[dict[str, Any]]:
    """One task run per job; one result row per job, in the order given."""
    options = options or TransferOptions()
    task = with_retries(transfer_study_task, settings)
    progress = Progress("studies finished")
    futures = [
        task.with_options(task_run_name=f"study-{i}").submit(
            settings, source, sink, job.study_uid, job.series_uids,
            Pseudonymization(pseudonymizer, job.pseudonym or None) if pseudonymizer else None,
            method, options.window, options.urgent)
        for i, job in enumerate(jobs, start=1)
    ]
    rows: list[dict[str, Any]] = []
    for i, (job, future) in enumerate(zip(jobs, futures, strict=True), start=1):
        future.wait()
        outcome = future.state.result(raise_on_failure=False)
        row: dict[str, Any] = {"study": i, "StudyInstanceUID": job.study_uid}
        if isinstance(outcome, OutsideWindow):
            row |= {"status": "postponed", "pseudonym": job.pseudonym,
                    "destination_study_uid": "", "expected": None, "transferred": 0,
                    "skipped": 0, "message": str(outcome), "opens": outcome.opens}
        elif isinstance(outcome, BaseException):
            row |= {"status": "failure", "pseudonym": job.pseudonym,
                    "destination_study_uid": "", "expected": None, "transferred": 0,
                    "skipped": 0, "message": str(outcome)}
        else:
            row |= {"status": outcome.status, "pseudonym": outcome.pseudonym,
                    "destination_study_uid": outcome.destination_study_uid,
                    "expected": outcome.expected, "transferred": outcome.transferred,
                    "skipped": outcome.skipped, "message": outcome.message}
        rows.append(row)
        progress.update(i, len(jobs))
        if progress_listener:
            progress_listener(i, len(jobs))
    return rows


def finish(rows: list[dict[str, Any]], options: TransferOptions, what: str) -> State:
    """Publish the result table (without original UIDs when pseudonymizing) and end the run:
    Failed when any study failed, so the UI shows it, with the rows as the result."""
    failed = sum(r["status"] == "failure" for r in rows)
    for row in rows:
        row.pop("opens", None)
    private = {"StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName",
               "PatientBirthDate", "AccessionNumber"} if options.pseudonymizing else set()
    table = [{k: v for k, v in r.items() if k not in private} for r in rows]
    create_table_artifact(key="transfer-result", table=table,
                          description=f"{len(rows) - failed} of {len(rows)} {what} transferred")
    get_run_logger().info("%d of %d %s transferred", len(rows) - failed, len(rows), what)
    if failed:
        return Failed(message=f"{failed} of {len(rows)} {what} failed", data=rows)
    return Completed(message=f"{len(rows)} {what} transferred", data=rows)
