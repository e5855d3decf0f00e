"""Batch query and batch transfer against the real servers, from files as users write them;
batch query postponement by a transfer window (controllable clock, in-process SCP)."""

from __future__ import annotations

import csv
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

import flows.batch
from adit_tasks import runs as runs_module
from adit_tasks.core import windows
from adit_tasks.core.batch import read_batch_file
from adit_tasks.core.options import TransferOptions
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study, write_study
from flows.batch import batch_query_flow, batch_transfer_flow
from tests.scp import MisbehavingSCP

SECRET = "batch-test-secret"


def small_study(patient_id: str, name: str, birth: str, n: int) -> StudySpec:
    return StudySpec(patient_id, name, birth, "20210301", "101010", f"ACCB{n:04d}",
                     "CT Kopf", (SeriesSpec("CT", "axial", 1, 1, 32, 32),))


@pytest.fixture(scope="module")
def extra(lab, tmp_path_factory):
    """40 one-instance studies and a patient who shares name and birth date with another."""
    folder = tmp_path_factory.mktemp("batch")
    present = [small_study(f"BATCH{n:03d}", f"Batch^Person{n}", "19900101", n)
               for n in range(40)]
    twin_of = present[0]
    twin = small_study("TWIN0001", twin_of.patient_name, twin_of.birth_date, 99)
    files = [p for s in [*present, twin] for p in write_study(s, folder)]
    lab.orthanc1.upload(files)
    return present, twin



def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def test_fifty_study_uids_ten_absent_are_answered_exactly(lab, extra, prefect_server,
                                                          tmp_path):
    present, _ = extra
    absent = [f"1.2.826.0.1.3680043.8.498.999{n}" for n in range(10)]
    uids = [s.study_uid for s in present] + absent
    batch = tmp_path / "list.csv"
    batch.write_text("StudyInstanceUID\n" + "\n".join(uids) + "\n")
    out = tmp_path / "answer.csv"
    state = batch_query_flow(str(batch), "orthanc1", str(out),
                             nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    rows = read_csv(out)
    assert len(rows) == 50 and state.is_completed()
    by_uid = {r["StudyInstanceUID"]: r for r in rows}
    for spec in present:
        assert by_uid[spec.study_uid]["Status"] == "found"
        assert by_uid[spec.study_uid]["NumberOfStudyRelatedInstances"] == "1"
    for uid in absent:
        assert by_uid[uid]["Status"] == "not found"
    assert [int(r["Row"]) for r in rows] == list(range(2, 52))


def test_name_and_birth_date_find_patient_ids_and_report_twins(lab, extra, prefect_server,
                                                               tmp_path):
    present, twin = extra
    unique = lab.demo[2]
    last, first = unique.patient_name.split("^")[:2]
    batch = (f"PatientName,PatientBirthDate\n\"{last}, {first}\",{unique.birth_date}\n"
             f"{twin.patient_name},{twin.birth_date}\nNobody^Here,2000-01-01\n")
    state = batch_query_flow(batch, "orthanc1", nodes_file=lab.nodes_file_in(tmp_path),
                             return_state=True)
    rows = state.result()
    first_row = [r for r in rows if r["Row"] == 2]
    assert {r["PatientID"] for r in first_row} == {unique.patient_id}
    assert {r["Status"] for r in first_row} == {"found"}
    twins = [r for r in rows if r["Row"] == 3]
    assert {r["PatientID"] for r in twins} == {present[0].patient_id, twin.patient_id}
    assert {r["Status"] for r in twins} == {"warning"}
    assert "2 patients match" in twins[0]["Message"]
    assert not any(r["PatientID"] in twins[0]["Message"] for r in twins)  # artifact, logs
    assert [r["Status"] for r in rows if r["Row"] == 4] == ["not found"]


def test_batch_transfer_of_several_patients_with_pseudonyms(lab, prefect_server, tmp_path,
                                                            monkeypatch):
    monkeypatch.setenv("ADIT_PSEUDONYM_SECRET", SECRET)
    specs = lab.demo
    pseudonyms = {}
    lines = ["PatientID;StudyInstanceUID;Pseudonym"]
    for spec in specs:
        pseudonyms[spec.patient_id] = f"SUBJ-{len(pseudonyms) + 1:02d}" if (
            spec.patient_id not in pseudonyms) else pseudonyms[spec.patient_id]
        lines.append(f"{spec.patient_id};{spec.study_uid};{pseudonyms[spec.patient_id]}")
    batch = tmp_path / "transfer.csv"
    batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "result.xlsx"
    state = batch_transfer_flow(str(batch), "orthanc1", "downloads",
                                TransferOptions(pseudonymize=True), str(out),
                                nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    rows = state.result()
    assert [r["Status"] for r in rows] == ["success"] * len(specs)
    assert [r["Instances"] for r in rows] == [s.instance_count for s in specs]
    for spec in specs:
        folder = tmp_path / "downloads" / pseudonyms[spec.patient_id]
        files = list(folder.rglob("*.dcm"))
        expected = sum(s.instance_count for s in specs if s.patient_id == spec.patient_id)
        assert len(files) == expected
        assert {pydicom.dcmread(f).PatientID for f in files} == {pseudonyms[spec.patient_id]}
    assert len(read_batch_file(out, "transfer")) == len(specs)  # result file reads back


def test_query_result_file_is_a_transfer_input(lab, prefect_server, tmp_path):
    spec = lab.demo[0]
    batch = f"PatientID,Modality\n{spec.patient_id},\nNOSUCHPATIENT,CT\n"
    out = tmp_path / "found.csv"
    batch_query_flow(batch, "orthanc1", str(out), nodes_file=lab.nodes_file_in(tmp_path))
    state = batch_transfer_flow(str(out), "orthanc1", "downloads",
                                nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    rows = state.result()
    found = [s for s in lab.demo if s.patient_id == spec.patient_id]
    assert sorted(r["Status"] for r in rows) == sorted(["success"] * len(found) + ["skipped"])
    written = list((tmp_path / "downloads").rglob("*.dcm"))
    assert len(written) == sum(s.instance_count for s in found)


def test_cli_rejects_a_bad_file_before_any_work(lab, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("PatientID,PatientBirthDate,Colour\nA1,31.02.2020,red\n")
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "batch-query", str(bad), "--source", "orthanc1",
         "--out", str(tmp_path / "r.csv"), "--nodes-file", str(lab.nodes_file)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert result.returncode == 2
    assert "row 2, column PatientBirthDate" in result.stderr
    # The unknown header is named by its column letter; its text stays out (it may be data).
    assert "row 1, column C: unknown column header <6 characters>" in result.stderr
    assert "Colour" not in result.stderr and "31.02.2020" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r.csv").exists()


def test_cli_batch_query_writes_the_result_file(lab, prefect_server, tmp_path):
    out = tmp_path / "r.xlsx"
    example = Path(__file__).resolve().parents[1] / "examples" / "batch_query.csv"
    demo_nodes = lab.nodes_file_in(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "batch-query", str(example), "--source",
         "orthanc1", "--out", str(out), "--nodes-file", demo_nodes],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr
    assert out.exists() and "result rows written" in result.stdout


# --- transfer windows: the one postponement loop (adit_tasks.runs.run_in_windows) ---------------

NIGHTS = "Mon-Fri 20:00-06:00"
MONDAY_NOON = dt.datetime(2026, 11, 23, 12, 0)  # a Monday, window closed
OPENS = dt.datetime(2026, 11, 23, 20, 0)


def window_lab(tmp_path: Path, n: int) -> tuple[list[str], list, Path]:
    """n one-instance studies for an in-process SCP, and a nodes file (written once its port
    is known) whose node `pacs` has a night window."""
    uids, datasets = [], []
    for i in range(n):
        spec = StudySpec(f"BQW{i}", "Window^Batch", "19700101", "20240101", "120000",
                         f"ACCBQW{i}", "CT", (SeriesSpec("CT", "ax", 1, 1, 16, 16),))
        uids.append(spec.study_uid)
        datasets += list(make_study(spec))
    return uids, datasets, tmp_path / "nodes.yaml"


def write_nodes(path: Path, scp: MisbehavingSCP) -> str:
    path.write_text(yaml.safe_dump({"nodes": [
        {"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port,
         "transfer_window": NIGHTS, "timeout": 10}]}))
    return str(path)


def test_batch_query_waits_for_the_window_in_the_one_loop(prefect_server, tmp_path,
                                                           monkeypatch) -> None:
    """A run started by hand waits in its process: every chunk meets the closed window, the
    one loop waits once for the opening (no association before it), then answers all rows."""
    uids, datasets, nodes = window_lab(tmp_path, 3)
    now = {"t": MONDAY_NOON}
    monkeypatch.setattr(windows, "clock", lambda: now["t"])
    monkeypatch.setattr(flows.batch, "ROWS_PER_TASK", 2)  # two chunks, postponed together
    waited: list[tuple[dt.datetime, int]] = []
    with MisbehavingSCP(datasets) as scp:

        def fake_sleep_until(when: dt.datetime) -> None:  # the clock jumps to the opening
            waited.append((when, scp.established))
            now["t"] = when

        monkeypatch.setattr(runs_module, "sleep_until", fake_sleep_until)
        state = batch_query_flow("StudyInstanceUID\n" + "\n".join(uids) + "\n", "pacs",
                                 nodes_file=write_nodes(nodes, scp), return_state=True)
        assert scp.established > 0
    assert waited == [(OPENS, 0)]
    rows = state.result()
    assert state.is_completed()
    assert [(r["Row"], r["Status"], r["StudyInstanceUID"]) for r in rows] == [
        (2, "found", uids[0]), (3, "found", uids[1]), (4, "found", uids[2])]


def test_batch_query_deployment_run_postpones_rows_and_schedules_once(prefect_server, tmp_path,
                                                                      monkeypatch) -> None:
    """A deployment run does not hold its worker for hours: its rows are written as postponed
    with the opening, and one new run is scheduled for it."""
    uids, datasets, nodes = window_lab(tmp_path, 3)
    monkeypatch.setattr(windows, "clock", lambda: MONDAY_NOON)
    monkeypatch.setattr(flows.batch, "ROWS_PER_TASK", 2)

    class Deployment:
        id = "deployment-1"

    scheduled: list[tuple[str, dt.datetime]] = []
    monkeypatch.setattr(flows.batch, "deployment", Deployment())
    monkeypatch.setattr(flows.batch, "schedule_again",
                        lambda dep, at: scheduled.append((dep, at)) or "night-run")

    def no_waiting(when: dt.datetime) -> None:
        raise AssertionError("a deployment run must not wait for the window")

    monkeypatch.setattr(runs_module, "sleep_until", no_waiting)
    out = tmp_path / "answer.csv"
    with MisbehavingSCP(datasets) as scp:
        state = batch_query_flow("StudyInstanceUID\n" + "\n".join(uids) + "\n", "pacs",
                                 str(out), nodes_file=write_nodes(nodes, scp),
                                 return_state=True)
        assert scp.established == 0
    assert scheduled == [("deployment-1", OPENS)]
    rows = state.result()
    assert state.is_completed()
    assert [(r["Row"], r["Status"]) for r in rows] == [(2, "postponed"), (3, "postponed"),
                                                       (4, "postponed")]
    assert all("opens at 2026-11-23 20:00" in r["Message"] and "'night-run'" in r["Message"]
               for r in rows)
    assert [(r["Row"], r["Status"]) for r in read_csv(out)] == [
        ("2", "postponed"), ("3", "postponed"), ("4", "postponed")]


def test_failed_rows_fail_the_run_with_the_rows_as_data(prefect_server, tmp_path) -> None:
    """A PACS that answers every C-FIND with 'out of resources': each row is a failure row,
    the result file is written, and the run ends Failed carrying the rows."""
    uids, datasets, nodes = window_lab(tmp_path, 2)
    out = tmp_path / "answer.xlsx"
    with MisbehavingSCP(datasets, busy=True) as scp:
        state = batch_query_flow("StudyInstanceUID\n" + "\n".join(uids) + "\n", "pacs",
                                 str(out), urgent=True, nodes_file=write_nodes(nodes, scp),
                                 return_state=True)
    assert state.is_failed() and state.message == "2 of 2 rows failed"
    rows = state.result(raise_on_failure=False)
    assert [(r["Row"], r["Status"], r["StudyInstanceUID"]) for r in rows] == [
        (2, "failure", uids[0]), (3, "failure", uids[1])]
    assert all(r["Message"] for r in rows)
    assert [r.row for r in read_batch_file(out, "query")] == [2, 3]  # the file reads back
