"""The `continuous_transfer` flow: keep a destination in sync with a source for a cohort.

Meant to run from a deployment on a cron schedule. The plan of each run is plain code
(`adit_tasks.core.continuous.RunPlanner`, unit-tested with a clock and no servers); this flow
runs its steps: a C-FIND task per chunk of days (with the run's retries) and the transfer of
what it found, and saves the job's state in the Prefect variable `adit_continuous_<job>` after
every step.

The variable is shown in the UI and copied into Prefect's events: a pseudonymizing job keeps
its failed studies there by keyed digest and chunk of days, never by original UID, and
retries them by querying that chunk again (`adit_tasks.core.continuous`, README "Privacy").
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import replace

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.types import MAX_VARIABLE_VALUE_LENGTH
from prefect.variables import Variable

from adit_tasks.core import windows
from adit_tasks.core.association import Connection, slot_held_by_caller
from adit_tasks.core.config import load_settings
from adit_tasks.core.continuous import (
    JobState,
    Pattern,
    RunPlanner,
    StudyFilter,
    Sweep,
    keyed_digest,
)
from adit_tasks.core.errors import ConfigError
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.plan import Gate, standing_job_key
from adit_tasks.core.windows import OutsideWindow
from adit_tasks.limits import ensure_node_limits
from adit_tasks.notify import notified_if_raising, notifier_for, notify_end
from adit_tasks.runs import publish_table, run_task, transfer_jobs
from adit_tasks.secrets import read_secrets
from adit_tasks.tasks import find_chunk_task

STATE_LIMIT = MAX_VARIABLE_VALUE_LENGTH - 100  # what a Prefect variable holds, with a margin


def state_variable(job: str) -> str:
    return "adit_continuous_" + re.sub(r"[^a-z0-9_]", "_", job.lower())


@flow(name="continuous-transfer", flow_run_name="continuous-{job}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), persist_result=False)
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
    notify: list[str] | None = None,
) -> State:
    """Transfer every study of `source` that matches the filters to `destination`, past and
    future, a bit more each run. `job` names the job (its state); jobs with different filters
    and destinations run side by side under different names. Each run:

    1. retries the studies that failed in earlier runs (never silently dropped; a
       pseudonymizing job knows them by keyed digest and queries their chunk of days again);
    2. sweeps the history from where the last run stopped, oldest first, `chunk_days` per
       C-FIND, up to today (or `end_date`); once the backlog is done it sweeps the last
       `overlap_days` again every run, because studies arrive late and grow (a study that
       gained instances gets the missing ones);
    3. re-checks `recheck_chunks` chunks of the history already swept, round-robin, so a study
       filed late under an old date is found too: within one re-check cycle of
       history chunks / `recheck_chunks` runs (the report shows the figure);
    4. stops early, leaving the cursor at the last chunk done, when the transfer window
       closes or `max_studies_per_run` studies were found (checked before each chunk);
    5. saves its state after every step, so a crash loses at most the chunk in flight and
       re-doing it duplicates nothing (studies already at the destination are skipped);
    6. reports as a table artifact: found, transferred, already present, failed, postponed,
       the backlog left, how far the re-check is, how many runs a full re-check cycle takes
       and when the last one finished.

    Patterns (descriptions, institution) are DICOM wildcards (`*thorax*`) or case-insensitive
    regular expressions between slashes (`/thorax|chest/`). `find_limit`: the most results the
    source returns for one C-FIND (0: no limit known); fuller answers are split by date.
    `notify`: e-mail addresses and http(s) webhook URLs told when a run has failures.
    """
    logger = get_run_logger()
    options = options or TransferOptions()
    settings = load_settings(nodes_file)
    notifier = notifier_for(settings, notify)
    with notified_if_raising(notifier, "continuous transfer"):
        node = settings.server(source)
        settings.node(destination)
        sweep = Sweep.of(start_date, end_date, chunk_days, overlap_days, recheck_chunks,
                         max_studies_per_run)
        flt = StudyFilter(modality=modality, study_description=Pattern(study_description),
                          series_description=Pattern(series_description),
                          institution_name=Pattern(institution_name), min_instances=min_instances)
        gate = Gate.of(node, options.window, options.urgent)
        conn = Connection(node, settings.ae_title, slot_held_by_caller)
        find_chunk = run_task(find_chunk_task, settings.retry)
        digest = None
        if options.pseudonymizing:
            secret = read_secrets(settings, options).pseudonym_secret
            if not secret:
                raise ConfigError("pseudonymization needs a secret: set ADIT_PSEUDONYM_SECRET or "
                                  "the Prefect Secret block 'adit-pseudonym-secret'")
            digest = keyed_digest(secret)
        ensure_node_limits([node])
        key = state_variable(job)
        manifest_key = standing_job_key(
            job, f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{str(flow_run.id or 'local')[:8]}")
        planner = RunPlanner(JobState.load(Variable.get(key, default=None), sweep.start), sweep,
                             windows.clock(), state_limit=STATE_LIMIT, digest=digest)

        def save() -> None:
            Variable.set(key, planner.state.dump(STATE_LIMIT), overwrite=True)

        try:
            while (step := planner.next_step()) is not None:
                gate.check()
                if step.kind == "retry" and not step.by_digest:
                    found = list(step.retry)
                else:
                    found = find_chunk.with_options(task_run_name=f"find-{step.name}")(
                        conn, gate, flt, step.first, step.last, find_limit)
                    if step.by_digest:  # only the failed studies of the chunk
                        found = [j for j in found if planner.key_of(j.study_uid) in step.keys]
                jobs = [replace(j, pseudonym=options.pseudonym) for j in found]
                # One folder manifest per run (not per chunk), in the job's own folder.
                results = transfer_jobs(settings, source, destination, jobs, options,
                                        continue_postponed=False,
                                        manifest_key=manifest_key) if jobs else []
                planner.record(step, results)
                save()
        except OutsideWindow as exc:
            planner.stop(str(exc))
        save()
        logger.info("run %d stopped: %s", planner.state.runs, planner.stopped)
        result = planner.summary()
        line = (f"found {result['found']}, rechecked {result['rechecked']}, transferred "
                f"{result['transferred']}, already present {result['already present']}, failed "
                f"{result['failed']}, backlog {result['backlog_days']} days")
        publish_table(planner.report_rows(),
                      key=f"continuous-{re.sub(r'[^a-z0-9-]', '-', job.lower())}",
                      description=f"continuous job {job}, run {planner.state.runs}: {line}")
        if result["failed"]:
            # Only runs with failures notify: a run every 30 minutes would flood the inbox.
            notify_end(notifier, "continuous transfer", planner.tally.as_dict(),
                       outcome="partial" if result["transferred"] else "failure")
            return Failed(message=line, data=result)
        return Completed(message=line, data=result)
