"""Running a run's studies and reporting them: the one run loop and the one publisher.

`run_studies(plan, jobs)` submits one task run per study (named by position, `study-3`, never
by patient data), turns every outcome into a typed `StudyResult`, continues studies that met
a closed transfer window when it opens, and finishes or abandons the job's archive.
`publish()` shows a result table (without original identifiers when pseudonymizing) and ends
the run Failed when anything failed, so the UI shows it.

Progress goes to a Prefect progress artifact and to the `adit.progress` logger (the CLI draws
its progress bar from those records): an explicit, standard channel, no module global.

Nothing here lets Prefect store patient data (README, "Privacy"): tasks run through
`run_task`, whose results (what a PACS answered) are never persisted, whatever Prefect's
settings say; the flows are declared with `persist_result=False` too; artifacts, logs and
state messages carry counts, statuses and messages, never names, IDs or birth dates, and a
pseudonymizing run's state data and tables carry no original UID.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run
from prefect.states import Completed, Failed, Scheduled, State
from prefect.utilities.annotations import quote

from adit_tasks.core.association import slot_held_by_caller
from adit_tasks.core.config import RetrieveMethod, RetryPolicy, Settings
from adit_tasks.core.errors import AditError
from adit_tasks.core.manifest import RunInfo
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.plan import TransferPlan, transfer_plan
from adit_tasks.core.results import StudyJob, StudyResult, summary
from adit_tasks.core.windows import OutsideWindow, sleep_until
from adit_tasks.limits import ensure_node_limits, reusing_leases, spare_node_slot
from adit_tasks.secrets import read_secrets
from adit_tasks.tasks import transfer_study_task, with_retries

progress_log = logging.getLogger("adit.progress")

T = TypeVar("T")
R = TypeVar("R")


class Progress:
    """A progress artifact (updated at most every few seconds: each update is an API call)
    and a record on the `adit.progress` logger per step, with `extra={"progress": (done,
    total)}`."""

    def __init__(self, description: str, every: float = 3.0) -> None:
        self._id = create_progress_artifact(0.0, description=description)
        self._every = every
        self._last = time.monotonic()

    def update(self, done: int, total: int) -> None:
        progress_log.debug("%d of %d done", done, total, extra={"progress": (done, total)})
        now = time.monotonic()
        if done == total or now - self._last >= self._every:
            update_progress_artifact(self._id, 100.0 * done / max(total, 1))
            self._last = now


def run_task(task_obj: Any, policy: RetryPolicy) -> Any:
    """The task as the flows run it: with the run's retry policy, and its results (and
    exceptions) never written to Prefect's result storage, even when an operator switches
    persistence on (PREFECT_RESULTS_PERSIST_BY_DEFAULT, PREFECT_TASKS_DEFAULT_PERSIST_RESULT):
    they hold what a PACS answered, names and IDs included. The results stay in the flow's
    process."""
    return with_retries(task_obj, policy).with_options(persist_result=False)


def results_in_order(task: Any, calls: list[tuple[str, tuple[Any, ...]]]) -> Iterator[Any]:
    """Submit one task run per (name, arguments), all at once (the task runner bounds how many
    run together); yield each one's result, or its exception, in the order given.

    The arguments are `quote`d: they hold no futures, and Prefect would otherwise walk through
    every object inside them (a plan: connections, nodes, sinks) for each task run, twice.
    The run's leases pass from one task to the next meanwhile (`limits.reusing_leases`)."""
    with reusing_leases():
        futures = [task.with_options(task_run_name=name).submit(*(quote(a) for a in args))
                   for name, args in calls]
        for future in futures:
            future.wait()
            yield future.state.result(raise_on_failure=False)


def run_in_windows(items: Sequence[T], run_round: Callable[[list[T]], list[R | OutsideWindow]],
                   *, can_wait: bool) -> tuple[dict[int, R], list[int], dt.datetime | None]:
    """Run the items in rounds until none meets a closed window, waiting for each opening in
    this process when `can_wait`. Returns the results by index, the indices still postponed
    (only when not waiting) and the earliest opening."""
    results: dict[int, R] = {}
    pending = list(range(len(items)))
    while pending:
        postponed: list[int] = []
        opens: dt.datetime | None = None
        for i, outcome in zip(pending, run_round([items[i] for i in pending]), strict=True):
            if isinstance(outcome, OutsideWindow):
                postponed.append(i)
                opens = min(opens or outcome.opens, outcome.opens)
            else:
                results[i] = outcome
        if not postponed or opens is None:
            return results, [], None
        if not can_wait:
            return results, postponed, opens
        get_run_logger().info("%d item(s) wait for the transfer window (opens %s)",
                              len(postponed), f"{opens:%Y-%m-%d %H:%M}")
        sleep_until(opens)
        pending = postponed
    return results, [], None


def run_studies(plan: TransferPlan, jobs: list[StudyJob], *,
                continue_postponed: bool = True) -> list[StudyResult]:
    """One task run per job; one typed result per job, in the order given.

    Studies that meet a closed window continue when it opens: a run started by hand waits in
    its process; a deployment run schedules a copy of itself for the opening and ends, so no
    worker slot is held for hours (re-running is safe: what is present is skipped). An archive
    job is never continued half-way, and `continue_postponed=False` (the continuous flow,
    whose next scheduled run continues) leaves them postponed.
    """
    if plan.complete_archive:
        return [StudyResult(i, job, "success",
                            message=f"archive {plan.complete_archive} is already complete")
                for i, job in enumerate(jobs, start=1)]
    task = run_task(transfer_study_task, plan.retry)
    progress = Progress("studies finished")
    numbered = list(enumerate(jobs, start=1))
    finished = 0

    def run_round(batch: list[tuple[int, StudyJob]]) -> list[StudyResult | OutsideWindow]:
        nonlocal finished
        outcomes: list[StudyResult | OutsideWindow] = []
        calls = [(f"study-{n}", (plan, job)) for n, job in batch]
        for (n, job), outcome in zip(batch, results_in_order(task, calls), strict=True):
            if isinstance(outcome, OutsideWindow):
                outcomes.append(outcome)
                continue
            if isinstance(outcome, BaseException):
                outcomes.append(StudyResult(n, job, "failure", message=str(outcome),
                                            pseudonym=job.pseudonym))
            else:
                outcomes.append(StudyResult(
                    n, job, outcome.status, expected=outcome.expected,
                    transferred=outcome.transferred, skipped=outcome.skipped,
                    message=outcome.message, pseudonym=outcome.pseudonym,
                    destination_study_uid=outcome.destination_study_uid))
            finished += 1
            progress.update(finished, len(jobs))
        return outcomes

    waits = continue_postponed and plan.archive is None and not deployment.id
    done, postponed, opens = run_in_windows(numbered, run_round, can_wait=waits)
    note = ""
    if postponed and opens is not None:
        if continue_postponed and deployment.id:
            note = (f"; continues in run '{schedule_again(deployment.id, opens)}' "
                    f"at {opens:%Y-%m-%d %H:%M}")
        elif plan.archive is not None:
            note = "; the archive was not written: run the job again then"
    results = [done[i] if i in done else StudyResult(
        n, job, "postponed", pseudonym=job.pseudonym, opens=opens,
        message=f"outside the transfer window of {plan.gate.node}; it opens at "
                f"{opens:%Y-%m-%d %H:%M}{note}")
        for i, (n, job) in enumerate(numbered)]
    _close_archive(plan, results)
    problem = _write_folder_manifest(plan)
    if problem:
        # Delivered, but the recipient cannot prove it: not a plain success.
        results = [replace(r, status="warning", message="; ".join(filter(None, (
            r.message, problem)))) if r.status == "success" else r for r in results]
    return results


def transfer_jobs(settings: Settings, source: str, destination: str, jobs: list[StudyJob],
                  options: TransferOptions, method: RetrieveMethod | None = None, *,
                  continue_postponed: bool = True,
                  manifest_key: str | None = None) -> list[StudyResult]:
    """The edge of every flow that moves studies: secrets, plan and limits, then the run.
    Everything that cannot work fails here (ConfigError), before any DICOM work.
    `manifest_key`: a standing job's folder manifest (core.plan.standing_job_key)."""
    source_node, target = settings.server(source), settings.node(destination)
    secrets = read_secrets(settings, options)
    with transfer_plan(source_node, target, options, jobs, calling_ae=settings.ae_title,
                       receiver=settings.receiver, retry=settings.retry, method=method,
                       pseudonym_secret=secrets.pseudonym_secret,
                       archive_password=secrets.archive_password,
                       slot=slot_held_by_caller, spare=spare_node_slot,
                       manifest_key=manifest_key) as plan:
        ensure_node_limits(list(plan.nodes))
        return run_studies(plan, jobs, continue_postponed=continue_postponed)


def _close_archive(plan: TransferPlan, results: list[StudyResult]) -> None:
    if plan.archive is None:
        return
    logger = get_run_logger()
    if any(r.status in ("failure", "postponed") for r in results):
        plan.archive.abandon()
        logger.warning("archive not written: a study failed or waits; a re-run starts it again")
    else:
        if plan.manifest is not None:
            plan.manifest.write_into(plan.archive, _run_info())  # before the archive closes
        logger.info("archive written: %s", plan.archive.finish().name)


def _write_folder_manifest(plan: TransferPlan) -> str:
    """A folder job's manifest, also when studies failed: it lists what is there. A failure
    to write it does not undo the studies, it turns their successes into warnings (`adit
    verify` would find no or an older manifest); the problem, or "" when it was written."""
    if plan.manifest is None or plan.manifest.root is None:
        return ""
    try:
        path = plan.manifest.write_to_folder(_run_info())
    except (OSError, AditError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        get_run_logger().warning("manifest not written: %s", reason)
        return f"the job's manifest could not be written ({reason}): adit verify cannot check it"
    get_run_logger().info("manifest written: %s", path.name)
    return ""


def _run_info() -> RunInfo:
    """This flow run, for the manifest's header (plain values: the core has no Prefect)."""
    return RunInfo(str(flow_run.id or ""), str(flow_run.name or ""),
                   dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def schedule_again(deployment_id: Any, at: dt.datetime) -> str:
    """A new run of this deployment with this run's parameters, scheduled for `at`."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            deployment_id, parameters=dict(flow_run.parameters),
            state=Scheduled(scheduled_time=at.astimezone()))
    return run.name


def publish(results: list[StudyResult], *, pseudonymizing: bool,
            what: str = "studies") -> State:
    """The result table artifact, a log line, and the run's final state with the results
    (a pseudonymizing run's without the original UIDs: `StudyResult.without_originals`)."""
    failed, line = summary(results, what)
    publish_table([r.row(pseudonymizing=pseudonymizing) for r in results],
                  key="transfer-result", description=line)
    data = [r.without_originals() for r in results] if pseudonymizing else results
    if failed:
        return Failed(message=line, data=data)
    return Completed(message=line, data=data)


def publish_table(table: list[dict[str, Any]], *, key: str, description: str) -> None:
    """A table artifact and the same line in the run's log (no patient data in either:
    callers pass only the columns that may be shown)."""
    create_table_artifact(key=key, table=table, description=description)
    get_run_logger().info(description)
