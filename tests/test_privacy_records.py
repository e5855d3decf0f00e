"""Patient data out of Prefect's records (issue 11).

Every flow runs once with a marker patient (`Zyxmarker^Quorra`, `ZYXMARK-4711`, born
1962-07-11) on the lab's real servers: in this process, through the `adit` CLI (subprocesses),
and as flow runs of deployments executed by a process worker (which logs at INFO, here with
ADIT's own loggers sent to the API too, and runs the flows without the CLI's up-front
checks). Result persistence is switched on for the whole module, as an operator might do
(`PREFECT_RESULTS_PERSIST_BY_DEFAULT`, `PREFECT_TASKS_DEFAULT_PERSIST_RESULT`; a canary flow
proves it), so anything a flow would let Prefect store ends up in the result storage folder,
which is searched too.

Then Prefect's records are searched for the marker's name, ID, birth date (three spellings)
and accession numbers, and for the original UIDs of the studies only pseudonymized jobs saw:

* the server's SQLite database, every column of every row (tests/records.py), with a
  `VACUUM INTO` copy's bytes as the proof that the row scan saw every occurrence;
* the raw database file and its write-ahead log (free pages and old page versions included)
  for the UIDs no allowed place may hold;
* the API: flow runs, their state history, task runs and their states, logs, artifacts,
  variables, events;
* the result storage folders.

Patient data may appear in two places only (README, "Privacy"): the parameters the user typed
and the result tables of searches the user asked to see (the `query-result` artifact of the
query flow, the study picker's form). For pseudonymized jobs, the original UIDs may appear
only where the user typed them (parameters).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime
from prefect.flow_runs import resume_flow_run
from prefect.variables import Variable

from adit_tasks.core.options import StudySearch, TransferOptions
from adit_tasks.lab.servers import free_port
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, write_study
from flows.batch import batch_query_flow, batch_transfer_flow
from flows.continuous import continuous_transfer_flow, state_variable
from flows.query import query_flow
from flows.runtime import stop_process_group
from flows.selective_transfer import selective_transfer_flow
from flows.transfer import transfer_flow
from tests import records

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))

NAME, PATIENT_ID, BIRTH = "Zyxmarker^Quorra", "ZYXMARK-4711", "19620711"
SECRET = "privacy-records-secret"
POOL = "adit-privacy"
JOB = "privacy-records"


def marker_study(n: int, date: str, description: str) -> StudySpec:
    return StudySpec(PATIENT_ID, NAME, BIRTH, date, "101500", f"ZQACC00{n}", description,
                     (SeriesSpec("CT", "zq axial", 1, 2, 32, 32),))


A = marker_study(1, "20010203", "ZQ study A")  # searched, picked, transferred as it is
B = marker_study(2, "20010204", "ZQ study B")  # only transferred pseudonymized
C = marker_study(3, "20010205", "ZQ continuous C")  # only by the pseudonymized continuous job

#: The marker patient's identifiers, in the spellings a record might use.
PATIENT = ["Zyxmarker", "Quorra", PATIENT_ID, BIRTH, "1962-07-11", "11.07.1962", "ZQACC00"]
#: Original UIDs that only pseudonymized jobs saw: allowed where the user typed them, only.
HIDDEN = [B.study_uid, B.series_uid(B.series[0]), C.study_uid, C.series_uid(C.series[0])]
#: Original UIDs no one typed: nowhere at all, not even in free pages of the database.
NEVER = [C.study_uid, C.series_uid(C.series[0])]

# Batch files that name the marker in bad cells: a header, an overflow cell, a wildcard in the
# ID, a birth date that is no date, a name as a modality, an ID as a UID, a date as a series
# number, a name with a backslash, a name as a pseudonym.
MALFORMED_QUERY = (
    f"PatientID,PatientName,PatientBirthDate,Modality,StudyInstanceUID,SeriesNumber,"
    f"StudyDescription,{NAME}\n"
    f"{PATIENT_ID}*,{NAME},1962-07-11x,{NAME},{PATIENT_ID},1962-07-11,Zyxmarker\\Quorra,\n"
    f"{PATIENT_ID},{NAME},11.07.1962,CT,,,,,{PATIENT_ID}\n"
)
MALFORMED_TRANSFER = (
    "PatientID,StudyInstanceUID,Pseudonym,Modality\n"
    f"{PATIENT_ID},{PATIENT_ID},Zyxmarker/Quorra,{NAME}\n"
    f"{PATIENT_ID}?,{B.study_uid}x,,\n"
)


CANARY = "persistence-is-on-4711"


@flow(name="privacy-canary")
def canary_flow() -> str:
    """Returns a value that Prefect persists when persistence is on (proof of the set-up)."""
    return CANARY


@dataclass
class Records:
    """What the module's runs left behind, and what the test needs to judge it."""

    tmp: Path
    since: dt.datetime
    started: float
    states: dict[str, Any] = field(default_factory=dict)  # in-process runs by label
    cli: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    deployment_runs: dict[str, UUID] = field(default_factory=dict)
    deployment_states: dict[UUID, Any] = field(default_factory=dict)
    picker_run: UUID | None = None
    continuous_state_after_failure: Any = None
    continuous_state_after_retry: Any = None
    run_ids: set[UUID] = field(default_factory=set)
    storage: Path = Path()


def _nodes_file(lab, tmp: Path) -> str:
    outputs = [{"name": f"out_{n}", "path": str(tmp / f"out_{n}")}
               for n in ("cli_transfer", "cli_batch", "worker", "plain", "batch_plain",
                         "batch_pseudo", "continuous", "picker")]
    dead = {"name": "deadend", "ae_title": "DEADEND", "host": "127.0.0.1",
            "port": free_port(), "max_associations": 1, "timeout": 2}
    return lab.nodes_file_in(tmp, *outputs, dead)


def _env(tmp: Path) -> dict[str, str]:
    """The environment of the module's subprocesses (and the settings of this process)."""
    return {
        "ADIT_PSEUDONYM_SECRET": SECRET,
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "storage"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ADIT_")}
    return subprocess.Popen([sys.executable, "-m", "deployments.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**base, **env}, cwd=cwd)


def _deployment_runs(client, nodes: str) -> dict[str, UUID]:
    """Deployments of the transfer and batch-query flows on a process pool of our own, and a
    flow run of each with the marker in its parameters."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    client.create_work_pool(WorkPoolCreate(
        name=POOL, type="process",
        base_job_template=ProcessWorker.get_default_base_job_template()), overwrite=True)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    ids = {}
    for flow_obj, entrypoint in ((transfer_flow, "flows/transfer.py:transfer_flow"),
                                 (batch_query_flow, "flows/batch.py:batch_query_flow")):
        ids[flow_obj.name] = client.create_deployment(
            flow_id=client.create_flow(flow_obj), name="privacy", entrypoint=entrypoint,
            work_pool_name=POOL, pull_steps=pull, enforce_parameter_schema=False,
            parameter_openapi_schema=parameter_schema(flow_obj).model_dump_for_openapi())
    runs = {
        "worker pseudonymized transfer": (ids["transfer"], {
            "source": "orthanc1", "destination": "out_worker", "studies": [B.study_uid],
            "options": {"pseudonymize": True}, "nodes_file": nodes}),
        "worker transfer of a typed ID": (ids["transfer"], {
            "source": "orthanc1", "destination": "out_worker", "studies": [PATIENT_ID],
            "nodes_file": nodes}),
        "worker malformed batch query": (ids["batch-query"], {
            "batch": MALFORMED_QUERY, "source": "orthanc1", "nodes_file": nodes}),
    }
    return {label: client.create_flow_run_from_deployment(deployment, parameters=params).id
            for label, (deployment, params) in runs.items()}


def _reset_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def _worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:

    output = log.open("wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", POOL],
        env={**os.environ, **env, "PREFECT_WORKER_QUERY_SECONDS": "1",
             "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_LOGGING_EXTRA_LOGGERS": "adit_tasks"},
        cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
        preexec_fn=_reset_sigint, start_new_session=True)
    try:
        yield worker
    finally:
        stop_process_group(worker, timeout=30)
        output.close()


def _run_picker(nodes: str, client) -> tuple[Any, UUID]:
    """The study picker: searches the marker's study A, is resumed from code with A ticked
    and pseudonymization chosen in the form."""
    import contextvars

    result: dict[str, Any] = {}
    context = contextvars.copy_context()  # the module's Prefect settings, in the thread
    runner = threading.Thread(target=lambda: context.run(lambda: result.update(
        state=selective_transfer_flow.with_options(flow_run_name="privacy-picker")(
            "orthanc1", "out_picker",
            search=StudySearch(patient_id=PATIENT_ID, study_date="2001-02-03"),
            nodes_file=nodes, return_state=True))))
    runner.start()
    run = records.wait_for_paused_run(client, "privacy-picker")
    schema = client.read_flow_run_input(run.id, run.state.state_details.run_input_keyset[
        "schema"])
    items = yaml.safe_load(schema)["properties"]["studies"]["items"]
    labels = items.get("enum") or [items["const"]]  # one study: a constant
    resume_flow_run(run.id, run_input={"studies": labels, "destination": "out_picker",
                                       "pseudonymize": True})
    runner.join(120)
    return result["state"], run.id


@pytest.fixture(scope="module")
def recorded(lab, prefect_server, tmp_path_factory) -> Iterator[Records]:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import (
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        PREFECT_TASKS_DEFAULT_PERSIST_RESULT,
        temporary_settings,
    )

    tmp = tmp_path_factory.mktemp("privacy")
    rec = Records(tmp, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1), time.time() - 1,
                  storage=tmp / "storage")
    files = [p for spec in (A, B, C) for p in write_study(spec, tmp / "studies")]
    lab.orthanc1.upload(files)
    nodes = _nodes_file(lab, tmp)
    env = _env(tmp)
    good_query = tmp / "good-query.csv"
    good_query.write_text(f"PatientName,PatientBirthDate,PatientID\n{NAME},1962-07-11,\n"
                          f"Zyxmarker^Nobody,11.07.1962,\n,,{PATIENT_ID}\n")
    malformed_query = tmp / "malformed-query.csv"
    malformed_query.write_text(MALFORMED_QUERY)
    malformed_transfer = tmp / "malformed-transfer.csv"
    malformed_transfer.write_text(MALFORMED_TRANSFER)
    plain_batch = tmp / "plain.csv"
    plain_batch.write_text(f"PatientID,StudyInstanceUID\n{PATIENT_ID},{A.study_uid}\n")
    pseudo_batch = tmp / "pseudo.csv"
    pseudo_batch.write_text(f"PatientID,StudyInstanceUID,SeriesInstanceUID\n{PATIENT_ID},"
                            f"{B.study_uid},{B.series_uid(B.series[0])}\n")

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in env.items():
            patch.setenv(key, value)
        stack.enter_context(temporary_settings(updates={
            PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
            PREFECT_TASKS_DEFAULT_PERSIST_RESULT: True,
            PREFECT_LOCAL_STORAGE_PATH: rec.storage,
        }))
        client = stack.enter_context(get_client(sync_client=True))

        # In the background: deployment runs on a worker, and the CLI.
        rec.deployment_runs = _deployment_runs(client, nodes)
        stack.enter_context(_worker(env, tmp / "worker.log"))
        commands = {
            "cli pseudonymized transfer": [
                "transfer", "--source", "orthanc1", "--destination", "out_cli_transfer",
                "--study", B.study_uid, "--pseudonymize", "--nodes-file", nodes],
            "cli pseudonymized batch transfer": [
                "batch-transfer", str(pseudo_batch), "--source", "orthanc1",
                "--destination", "out_cli_batch", "--pseudonymize", "--nodes-file", nodes],
            "cli malformed batch transfer": [
                "batch-transfer", str(malformed_transfer), "--source", "orthanc1",
                "--destination", "out_cli_batch", "--nodes-file", nodes],
            "cli malformed batch query": [
                "batch-query", str(malformed_query), "--source", "orthanc1",
                "--out", str(tmp / "cli-malformed.csv"), "--nodes-file", nodes],
            "cli batch query": [
                "batch-query", str(good_query), "--source", "orthanc1",
                "--out", str(tmp / "cli-found.csv"), "--nodes-file", nodes],
        }
        processes = {label: _cli(args, env, tmp) for label, args in commands.items()}

        # In this process, one flow after the other.
        runs = rec.states
        runs["canary"] = canary_flow(return_state=True)
        runs["query"] = query_flow("orthanc1", StudySearch(
            patient_name=NAME, birth_date="1962-07-11", study_date="2001-02-03"),
            nodes_file=nodes, return_state=True)
        runs["transfer"] = transfer_flow("orthanc1", "out_plain", [A.study_uid],
                                         nodes_file=nodes, return_state=True)
        runs["transfer of a typed ID"] = transfer_flow(
            "orthanc1", "out_plain", [A.study_uid, PATIENT_ID], nodes_file=nodes,
            return_state=True)
        runs["malformed batch query"] = batch_query_flow(
            MALFORMED_QUERY, "orthanc1", nodes_file=nodes, return_state=True)
        runs["malformed batch transfer"] = batch_transfer_flow(
            MALFORMED_TRANSFER, "orthanc1", "out_batch_plain", nodes_file=nodes,
            return_state=True)
        runs["batch query"] = batch_query_flow(
            str(good_query), "orthanc1", str(tmp / "found.csv"), level="series",
            nodes_file=nodes, return_state=True)
        runs["batch transfer"] = batch_transfer_flow(
            str(plain_batch), "orthanc1", "out_batch_plain", nodes_file=nodes,
            return_state=True)
        runs["pseudonymized batch transfer"] = batch_transfer_flow(
            str(pseudo_batch), "orthanc1", "out_batch_pseudo",
            TransferOptions(pseudonymize=True), nodes_file=nodes, return_state=True)
        continuous = dict(job=JOB, source="orthanc1", start_date="2001-02-01",
                          end_date="2001-02-10", study_description="ZQ continuous*",
                          options=TransferOptions(pseudonymize=True), chunk_days=10,
                          nodes_file=nodes, return_state=True)
        runs["continuous to a dead end"] = continuous_transfer_flow(
            destination="deadend", **continuous)
        rec.continuous_state_after_failure = Variable.get(state_variable(JOB))
        runs["continuous retry"] = continuous_transfer_flow(
            destination="out_continuous", **continuous)
        rec.continuous_state_after_retry = Variable.get(state_variable(JOB))
        runs["picker"], rec.picker_run = _run_picker(nodes, client)

        for label, process in processes.items():
            out, err = process.communicate(timeout=240)
            rec.cli[label] = subprocess.CompletedProcess(process.args, process.returncode,
                                                         out, err)
        rec.deployment_states = records.wait_for_final(client, rec.deployment_runs.values())
        for label, run_id in list(rec.deployment_runs.items()):
            if rec.deployment_states[run_id].is_crashed():
                # A flow-run process can die of SQLite's "database is locked" under this
                # module's load (seen once): such a run is started once more, and both are
                # searched. A crash of ours (an import error) crashes the second one too.
                again = client.create_flow_run_from_deployment(
                    client.read_flow_run(run_id).deployment_id,
                    parameters=client.read_flow_run(run_id).parameters)
                rec.deployment_runs[label] = again.id
                rec.deployment_states |= records.wait_for_final(client, [again.id])
                rec.run_ids.add(run_id)

        APILogHandler().flush()
        EventsWorker.drain_all(timeout=10)
        records.wait_for_quiet_events(records.database_file())
        rec.run_ids |= {r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=rec.since)))}
        rec.run_ids |= set(rec.deployment_runs.values())
        yield rec
        # Nothing of this module's job stays for other modules.
        client.delete_variable_by_name(state_variable(JOB))


# --- the runs did what they should --------------------------------------------------------------


def test_every_flow_ran(recorded: Records) -> None:
    s = recorded.states
    for label in ("query", "transfer", "batch query", "batch transfer",
                  "pseudonymized batch transfer", "continuous retry", "picker"):
        assert s[label].is_completed(), (label, s[label])
    for label in ("transfer of a typed ID", "malformed batch query",
                  "malformed batch transfer", "continuous to a dead end"):
        assert s[label].is_failed(), (label, s[label])
    assert [r["Status"] for r in s["batch transfer"].result()] == ["success"]
    assert [r.status for r in s["picker"].result()] == ["success"]
    codes = {label: r.returncode for label, r in recorded.cli.items()}
    assert codes == {"cli pseudonymized transfer": 0, "cli pseudonymized batch transfer": 0,
                     "cli malformed batch transfer": 2, "cli malformed batch query": 2,
                     "cli batch query": 0}, {k: r.stderr[-1500:] for k, r in
                                              recorded.cli.items()}
    states = {label: recorded.deployment_states[run]
              for label, run in recorded.deployment_runs.items()}
    log = (recorded.tmp / "worker.log").read_text(errors="replace")[-3000:]
    assert states["worker pseudonymized transfer"].is_completed(), (states, log)
    assert states["worker transfer of a typed ID"].is_failed(), states
    assert states["worker malformed batch query"].is_failed(), states
    for folder in ("out_cli_transfer", "out_cli_batch", "out_worker", "out_batch_pseudo",
                   "out_continuous", "out_picker"):
        assert len(list((recorded.tmp / folder).rglob("*.dcm"))) == 2, folder


def test_continuous_state_keeps_a_keyed_digest_and_retries_the_study(
        recorded: Records) -> None:
    failed = recorded.continuous_state_after_failure["failed"]
    digest = hmac.new(SECRET.encode(), b"adit-continuous-failed-study\x00"
                      + C.study_uid.encode(), hashlib.sha256).hexdigest()[:32]
    assert list(failed) == [f"hmac:{digest}"]  # no UID: a keyed digest and its days
    first, last = failed[f"hmac:{digest}"]["chunk"]
    assert first <= C.study_date <= last and "series" not in failed[f"hmac:{digest}"]
    assert recorded.continuous_state_after_retry["failed"] == {}
    assert recorded.states["continuous retry"].result()["retried"] == 1


# --- the records ---------------------------------------------------------------------------------


def _allowed(hit: records.Hit, picker_run: UUID | None) -> bool:
    """The two documented places: parameters the user typed; the result tables of searches
    the user asked to see (the query flow's artifact, the study picker's form)."""
    if hit.table == "flow_run" and hit.column == "parameters":
        return True
    if hit.needle in HIDDEN:  # original UIDs of pseudonymized jobs: where typed, only
        return False
    if hit.table in ("artifact", "artifact_collection") and hit.row.get("key") == "query-result":
        return hit.column in ("data", "description")
    if (hit.table == "events" and hit.column == "payload"  # Prefect's copy of that artifact
            and str(hit.row.get("event", "")).startswith("prefect.artifact-collection.")
            and '"prefect.resource.name": "query-result"' in str(hit.row.get("resource"))):
        return True
    if hit.table == "flow_run_input" and picker_run is not None:
        return str(hit.row.get("flow_run_id", "")).replace("-", "") == picker_run.hex
    return False


def test_database_holds_patient_data_only_in_the_two_documented_places(
        recorded: Records) -> None:
    hits, _ = records.scan_database(records.database_file(), PATIENT + HIDDEN)
    leaks = [h for h in hits if not _allowed(h, recorded.picker_run)]
    assert not leaks, records.report(leaks)
    assert any(h.table == "flow_run" for h in hits), "the scan found not even the parameters"


def test_the_row_scan_saw_every_occurrence_in_the_database_bytes(recorded: Records) -> None:
    needles = PATIENT + HIDDEN
    path = records.database_file()
    copy = records.vacuum_copy(path, recorded.tmp / "live.db")
    _, in_rows = records.scan_database(copy, needles)
    in_bytes = records.raw_counts([copy], needles)
    assert in_bytes == in_rows


def test_uids_nobody_typed_are_nowhere_in_the_database_files(recorded: Records) -> None:
    path = records.database_file()
    files = [path, path.with_name(path.name + "-wal")]
    assert records.raw_counts(files, NEVER) == dict.fromkeys(NEVER, 0)


def test_the_api_shows_patient_data_only_in_the_query_result(recorded: Records) -> None:
    with get_client(sync_client=True) as client:
        hits = records.scan_api(client, PATIENT + HIDDEN, recorded.run_ids,
                                since=recorded.since,
                                skip_artifact_keys=frozenset({"query-result"}))
    assert not hits, records.report(hits)


def test_pseudonymized_picker_run_shows_no_original_uid(recorded: Records) -> None:
    assert recorded.picker_run is not None
    originals = [A.study_uid, A.series_uid(A.series[0])]
    with get_client(sync_client=True) as client:
        hits = records.scan_api(client, originals, {recorded.picker_run},
                                since=dt.datetime.now(dt.UTC))
    assert not hits, records.report(hits)


def test_result_storage_holds_no_patient_data(recorded: Records) -> None:
    from prefect.settings import get_current_settings

    canary, _ = records.scan_folder(recorded.storage, [CANARY])
    assert canary, "persistence was not on: the canary flow's result is not in the storage"
    default = Path(get_current_settings().results.local_storage_path)
    for folder in (recorded.storage, default):
        hits, _ = records.scan_folder(folder, PATIENT + HIDDEN, since=recorded.started)
        assert not hits, records.report(hits)


# --- the continuous state of a pseudonymizing job, without servers ------------------------------


def test_planner_keeps_failures_by_digest_and_chunk_and_never_drops_them() -> None:
    from adit_tasks.core.continuous import NOT_FOUND_AGAIN, JobState, RunPlanner, Step, Sweep
    from adit_tasks.core.continuous import keyed_digest as make_digest
    from adit_tasks.core.results import StudyJob, StudyResult

    now, uid = dt.datetime(2026, 6, 30, 12, 0), "1.2.826.0.1.3680043.8.498.1234"
    digest, sweep = make_digest(SECRET), Sweep.of("2024-07-01")
    state = JobState(cursor="20250101")
    planner = RunPlanner(state, sweep, now, digest=digest)
    step = planner.next_step()
    planner.record(step, [StudyResult(1, StudyJob(uid, (uid + ".1",)), "failure",
                                      message="refused")])
    assert state.failed == {digest(uid): {"attempts": 1, "message": "refused",
                                          "chunk": ["20250101", "20250107"]}}
    assert uid not in str(state.dump())  # neither the study's nor its series' UID
    # Next run: the chunk is queried again for the failed digests; not found again, the
    # study stays failed (and is counted so).
    planner = RunPlanner(state, sweep, now, digest=digest)
    step = planner.next_step()
    assert step == Step("retry", dt.date(2025, 1, 1), dt.date(2025, 1, 7),
                        keys=frozenset({digest(uid)}))
    assert step.name == "retry-20250101-20250107" and planner.key_of(uid) in step.keys
    planner.record(step, [])
    assert state.failed[digest(uid)]["attempts"] == 2
    assert state.failed[digest(uid)]["message"] == NOT_FOUND_AGAIN
    assert planner.tally.failed == planner.tally.retried == 1
    # A job that no longer has the secret cannot recognise it: it waits in the state.
    assert RunPlanner(state, sweep, now).next_step().kind == "sweep"
    assert digest(uid) in state.failed
    # Any later chunk that finds the study and transfers it clears it (a re-dated study).
    planner = RunPlanner(state, sweep, now, digest=digest)
    assert planner.next_step().kind == "retry"
    planner.record(Step("retry", dt.date(2025, 1, 1), dt.date(2025, 1, 7),
                        keys=frozenset({digest(uid)})), [])
    step = planner.next_step()
    assert step.kind == "sweep"
    planner.record(step, [StudyResult(1, StudyJob(uid), "success", transferred=1)])
    assert state.failed == {}


def test_keyed_digest_needs_the_secret() -> None:
    from adit_tasks.core.continuous import keyed_digest as make_digest

    uid = C.study_uid
    assert make_digest(SECRET)(uid) == make_digest(SECRET)(uid)  # stable across runs
    assert make_digest(SECRET)(uid) != make_digest("another secret")(uid)
    plain = hashlib.sha256(uid.encode()).hexdigest()
    assert plain[:32] not in make_digest(SECRET)(uid)  # not a plain hash anyone can redo
