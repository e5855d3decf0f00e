"""The `transfer` flow: studies (or selected series) from a source to a destination node,
optionally pseudonymized, to a server, a folder, or an encrypted archive in a folder.

One Prefect task run per study, so retries, concurrency limits and progress in the UI are per
study. Task runs are named by position (`study-3`), never by patient data. Secrets (the
pseudonymization key, the archive password) come from the environment, `.env` or Prefect
Secret blocks, never from flow parameters, which the Prefect server stores and shows.

A deployment run gets its UIDs without the CLI's checks: a value that is not a UID (a Patient
ID typed into the wrong field) fails the run by its position and length, never by its text,
because the message reaches the run's state, log and events (README, "Privacy").
"""

from __future__ import annotations

from prefect import flow
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.core.config import RetrieveMethod, load_settings
from adit_tasks.core.errors import ConfigError, InvalidInput
from adit_tasks.core.find import is_uid
from adit_tasks.core.notice import status_counts
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.results import StudyJob
from adit_tasks.notify import notified_if_raising, notifier_for, notify_end
from adit_tasks.runs import publish, transfer_jobs


@flow(name="transfer", flow_run_name="transfer-{source}-to-{destination}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), persist_result=False)
def transfer_flow(
    source: str,
    destination: str,
    studies: list[str],
    series: list[str] | None = None,
    options: TransferOptions | None = None,
    method: RetrieveMethod | None = None,
    nodes_file: str | None = None,
    notify: list[str] | None = None,
) -> State:
    """Transfer `studies` (StudyInstanceUIDs) from `source` to `destination`.

    `series` (SeriesInstanceUIDs) limits the transfer to those series of the one study given.
    `options`: pseudonymization, trial, archive and window (see TransferOptions). The
    pseudonymization key comes from ADIT_PSEUDONYM_SECRET (or the Prefect Secret block
    `adit-pseudonym-secret`), the archive password from ADIT_ARCHIVE_PASSWORD (or
    `adit-archive-password`). `notify`: e-mail addresses and http(s) webhook URLs told
    when the run ends (besides the nodes file's `notify.recipients`). Returns one result per
    study.
    """
    options = options or TransferOptions()
    study_uids = checked_uids(studies, "StudyInstanceUID")
    series_uids = tuple(checked_uids(series or [], "SeriesInstanceUID"))
    if not study_uids:
        raise ConfigError("no studies given")
    if series_uids and len(study_uids) != 1:
        raise ConfigError("series can only be selected when exactly one study is given")
    jobs = [StudyJob(uid, series_uids, options.pseudonym) for uid in study_uids]
    settings = load_settings(nodes_file)
    notifier = notifier_for(settings, notify)
    with notified_if_raising(notifier, "transfer"):
        results = transfer_jobs(settings, source, destination, jobs, options, method)
        state = publish(results, pseudonymizing=options.pseudonymizing)
    notify_end(notifier, "transfer", status_counts(r.status for r in results))
    return state


def checked_uids(values: list[str], what: str) -> list[str]:
    """The UIDs as given (blanks around them removed); InvalidInput naming a bad one by its
    position and length, never by its text (it may be a Patient ID in the wrong field)."""
    uids = [value.strip() for value in values]
    for n, uid in enumerate(uids, start=1):
        if not is_uid(uid):
            raise InvalidInput(f"{what} {n} of {len(uids)} is not a valid UID ({len(uid)} "
                               "characters; digits and dots, no leading zeros, at most 64)")
    return uids
