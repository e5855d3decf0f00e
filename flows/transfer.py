"""The `transfer` flow: studies (or selected series) from a source to a destination node,
optionally pseudonymized, to a server, a folder, or an encrypted archive in a folder.

One Prefect task run per study, so retries, concurrency limits and progress in the UI are per
study. Task runs are named by position (`study-3`), never by patient data. Secrets (the
pseudonymization key, the archive password) come from the environment or Prefect Secret
blocks, never from flow parameters, which the Prefect server stores and shows.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from adit_tasks.archive import ArchiveWriter
from adit_tasks.config import FolderNode, RetrieveMethod, SecretSettings, Settings, load_settings
from adit_tasks.errors import ConfigError
from adit_tasks.find import validate_uid
from adit_tasks.folder import safe_component
from adit_tasks.pseudonymize import PseudonymizationOptions, Pseudonymizer
from adit_tasks.tasks import (
    ensure_node_limits,
    make_sink,
    transfer_study_task,
    with_retries,
)
from adit_tasks.transfer import Pseudonymization

PSEUDONYM_SECRET_BLOCK = "adit-pseudonym-secret"
ARCHIVE_PASSWORD_BLOCK = "adit-archive-password"


def read_secret(value: Any, block: str) -> str:
    """A secret from the environment (`.env`), else from a Prefect Secret block, else ''."""
    if value is not None:
        return value.get_secret_value()
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(block).get())
    except Exception:  # no such block, or no Prefect server to ask
        return ""


@flow(name="transfer", flow_run_name="transfer-{source}-to-{destination}",
      task_runner=ThreadPoolTaskRunner(max_workers=4))
def transfer_flow(
    source: str,
    destination: str,
    studies: list[str],
    series: list[str] | None = None,
    pseudonymize: bool = False,
    pseudonym: str = "",
    trial_id: str = "",
    trial_name: str = "",
    dates: Literal["shift", "keep", "remove"] = "shift",
    retain_patient_characteristics: bool = False,
    retain_device_identity: bool = False,
    clean_descriptors: bool = True,
    allow_burned_in: bool = False,
    archive: bool = False,
    compress: bool = False,
    method: RetrieveMethod | None = None,
    nodes_file: str | None = None,
) -> State:
    """Transfer `studies` (StudyInstanceUIDs) from `source` to `destination`.

    - `series`: SeriesInstanceUIDs to limit the transfer to (exactly one study then).
    - `pseudonymize` (implied by `pseudonym`): PS3.15 basic profile, keyed by the secret in
      ADIT_PSEUDONYM_SECRET (or the Prefect Secret block `adit-pseudonym-secret`). Without a
      `pseudonym` each patient gets one derived from the PatientID and the secret.
    - `dates`: shift (by a per-patient offset, default), keep, or remove.
    - `trial_id`/`trial_name`: written to ClinicalTrialProtocolID/Name.
    - `archive`: one AES-256 7-Zip archive in the destination folder (password from
      ADIT_ARCHIVE_PASSWORD or the Secret block `adit-archive-password`).
    Returns one result row per study.
    """
    logger = get_run_logger()
    settings = load_settings(nodes_file)
    studies = [validate_uid(s, "StudyInstanceUID") for s in studies]
    series_uids = tuple(validate_uid(s, "SeriesInstanceUID") for s in series or ())
    if not studies:
        raise ConfigError("no studies given")
    if series_uids and len(studies) != 1:
        raise ConfigError("series can only be selected when exactly one study is given")
    source_node = settings.server(source)
    pseudo = None
    if pseudonymize or pseudonym or trial_id or trial_name:
        secret = read_secret(SecretSettings().pseudonym_secret, PSEUDONYM_SECRET_BLOCK)
        if not secret:
            raise ConfigError("pseudonymization needs a secret: set ADIT_PSEUDONYM_SECRET or "
                              f"the Prefect Secret block '{PSEUDONYM_SECRET_BLOCK}'")
        options = PseudonymizationOptions(
            dates=dates, retain_patient_characteristics=retain_patient_characteristics,
            retain_device_identity=retain_device_identity,
            clean_descriptors=clean_descriptors, allow_burned_in=allow_burned_in,
            safe_private_creators=frozenset(source_node.safe_private_creators),
            trial_protocol_id=trial_id, trial_protocol_name=trial_name)
        pseudo = Pseudonymization(Pseudonymizer(secret, options), pseudonym or None)

    writer = None
    if archive:
        folder = settings.node(destination)
        if not isinstance(folder, FolderNode):
            raise ConfigError(f"archives are written to folder nodes; '{destination}' is not")
        path = folder.path / archive_name(trial_id, studies, series_uids, pseudo is not None,
                                          pseudonym, dates)
        if path.exists():
            rows = [{"study": i, "status": "success", "message": f"archive {path.name} exists"}
                    for i in range(1, len(studies) + 1)]
            return Completed(message=f"archive {path.name} already complete", data=rows)
        password = read_secret(SecretSettings().archive_password, ARCHIVE_PASSWORD_BLOCK)
        if not password:
            raise ConfigError("archives need a password: set ADIT_ARCHIVE_PASSWORD or the "
                              f"Prefect Secret block '{ARCHIVE_PASSWORD_BLOCK}'")
        writer = ArchiveWriter(path, password, compress=compress)
    sink = make_sink(settings, destination, writer)
    ensure_node_limits(settings)

    rows = run_studies(settings, source, sink, studies, series_uids, pseudo, method)
    failed = sum(r["status"] == "failure" for r in rows)
    if writer is not None:
        if failed:
            writer.abandon()
        else:
            logger.info("archive written: %s", writer.finish().name)
    public = [{k: v for k, v in r.items() if not (pseudo and k == "StudyInstanceUID")}
              for r in rows]
    create_table_artifact(key="transfer-result", table=public,
                          description=f"{len(rows) - failed} of {len(rows)} studies transferred")
    logger.info("%d of %d studies transferred", len(rows) - failed, len(rows))
    if failed:
        return Failed(message=f"{failed} of {len(rows)} studies failed", data=rows)
    return Completed(message=f"{len(rows)} studies transferred", data=rows)


def run_studies(settings: Settings, source: str, sink: Any, studies: list[str],
                series_uids: tuple[str, ...], pseudo: Pseudonymization | None,
                method: RetrieveMethod | None) -> list[dict[str, Any]]:
    """One task run per study; one result row per study, in the order given."""
    task = with_retries(transfer_study_task, settings)
    progress = create_progress_artifact(0.0, description="studies finished")
    futures = [
        task.with_options(task_run_name=f"study-{i}").submit(
            settings, source, sink, uid, series_uids, pseudo, method)
        for i, uid in enumerate(studies, start=1)
    ]
    rows: list[dict[str, Any]] = []
    for i, (uid, future) in enumerate(zip(studies, futures, strict=True), start=1):
        future.wait()
        outcome = future.state.result(raise_on_failure=False)
        row: dict[str, Any] = {"study": i, "StudyInstanceUID": uid}
        if isinstance(outcome, BaseException):
            row |= {"status": "failure", "pseudonym": "", "destination_study_uid": "",
                    "expected": None, "transferred": 0, "skipped": 0, "message": str(outcome)}
        else:
            row |= {"status": outcome.status, "pseudonym": outcome.pseudonym,
                    "destination_study_uid": outcome.destination_study_uid,
                    "expected": outcome.expected, "transferred": outcome.transferred,
                    "skipped": outcome.skipped, "message": outcome.message}
        rows.append(row)
        update_progress_artifact(progress, 100.0 * i / len(studies))
    return rows


def archive_name(trial_id: str, studies: list[str], series: tuple[str, ...],
                 pseudonymized: bool, pseudonym: str, dates: str) -> str:
    """`<trial or adit>-<job hash>.7z`: the same job always gets the same name (re-runs skip
    it), and the name reveals nothing about the patients."""
    job = json.dumps([sorted(studies), sorted(series), pseudonymized, pseudonym, dates])
    digest = hashlib.sha256(job.encode()).hexdigest()[:12]
    return f"{safe_component(trial_id, 'adit')}-{digest}.7z"
