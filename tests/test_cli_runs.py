"""The `adit` commands that run flows, as a user runs them (a subprocess), against the lab's
real servers and the session's Prefect server: options made from TransferOptions, which nodes
file wins, secrets from `.env`, and what the terminal shows when a study fails."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import py7zr
import pydicom
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from adit_tasks.lab.servers import free_port

SECRETS = {"ADIT_PSEUDONYM_SECRET": "cli-test-secret", "ADIT_ARCHIVE_PASSWORD": "cli-pw-42"}


def adit(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
         stderr: int | None = None) -> subprocess.CompletedProcess[str]:
    """`adit ARGS` in a subprocess, with the test's Prefect server and without any ADIT_*
    variable of the test process (secrets and nodes file only as the test gives them)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ADIT_")}
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], text=True,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if stderr is None else stderr,
                          timeout=240, env={**base, **(env or {})}, cwd=cwd)


def nodes_file(lab, tmp_path: Path, name: str = "nodes.yaml", **orthanc1: object) -> Path:
    """A copy of the lab's nodes file in tmp_path: `downloads` under tmp_path, orthanc1's
    entry updated with `orthanc1`."""
    config = yaml.safe_load(lab.nodes_file.read_text())
    for node in config["nodes"]:
        if node["name"] == "downloads":
            node["path"] = str(tmp_path / "downloads")
        if node["name"] == "orthanc1":
            node.update(orthanc1)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_batch_transfer_takes_every_transfer_option_and_method(lab, prefect_server, tmp_path):
    spec = lab.demo[0]
    # The source prefers WADO-RS at an address where nothing answers: only --method c-get
    # makes this transfer work.
    nodes = nodes_file(lab, tmp_path, retrieve=["wado-rs", "c-get"],
                       dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    batch = tmp_path / "batch.csv"
    batch.write_text(f"PatientID,StudyInstanceUID,Pseudonym\n{spec.patient_id},"
                     f"{spec.study_uid},CLI-001\n")
    result = adit("batch-transfer", str(batch), "--source", "orthanc1",
                  "--destination", "downloads", "--pseudonymize", "--dates", "remove",
                  "--archive", "--compress", "--method", "c-get", "--trial-id", "CLI",
                  "--out", str(tmp_path / "result.csv"), "--nodes-file", str(nodes),
                  env=SECRETS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"row 2: success  {spec.instance_count} instances" in result.stdout
    [archive] = (tmp_path / "downloads").glob("CLI-*.7z")
    with py7zr.SevenZipFile(archive, "r", password=SECRETS["ADIT_ARCHIVE_PASSWORD"]) as z:
        assert "LZMA2" in z.archiveinfo().method_names  # --compress
        z.extractall(tmp_path / "x")
    files = list((tmp_path / "x").rglob("*.dcm"))
    assert len(files) == spec.instance_count
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientID == "CLI-001"
        assert not ds.get("StudyDate")  # --dates remove (shifted dates would be kept)


def test_nodes_file_option_wins_over_the_environment(lab, prefect_server, tmp_path):
    """ADIT_NODES_FILE names a file whose orthanc1 points at a closed port; --nodes-file
    names the right one, and every command (and its flow run) must use that."""
    wrong = nodes_file(lab, tmp_path, "wrong.yaml", port=free_port(), timeout=2,
                       retrieve=["c-get"])
    right = nodes_file(lab, tmp_path, "right.yaml")
    env = {"ADIT_NODES_FILE": str(wrong)}
    spec = lab.demo[1]
    moved = adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                 "--study", spec.study_uid, "--nodes-file", str(right), env=env)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert f"study 1: success  {spec.instance_count}/{spec.instance_count} instances" \
        in moved.stdout
    batch = tmp_path / "batch.csv"
    batch.write_text(f"PatientID,StudyInstanceUID\n{spec.patient_id},{spec.study_uid}\n")
    again = adit("batch-transfer", str(batch), "--source", "orthanc1", "--destination",
                 "downloads", "--nodes-file", str(right), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "row 2: success" in again.stdout
    query = tmp_path / "query.csv"
    query.write_text(f"PatientID\n{spec.patient_id}\n")
    found = adit("batch-query", str(query), "--source", "orthanc1", "--out",
                 str(tmp_path / "found.csv"), "--nodes-file", str(right), env=env)
    assert found.returncode == 0, found.stdout + found.stderr
    studies = sum(s.patient_id == spec.patient_id for s in lab.demo)
    assert found.stdout.rstrip().endswith(f": {studies} found"), found.stdout
    # The environment's file is used when no --nodes-file is given (and fails here).
    failed = adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                  "--study", spec.study_uid, env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr


def test_secrets_from_a_dotenv_file_in_the_working_directory(lab, prefect_server, tmp_path):
    spec = lab.demo[2]
    nodes = nodes_file(lab, tmp_path)
    args = ("transfer", "--source", "orthanc1", "--destination", "downloads", "--study",
            spec.study_uid, "--pseudonymize", "--archive", "--trial-id", "DOTENV",
            "--nodes-file", str(nodes))
    # Without a password anywhere: nothing is asked, nothing done, exit 2 and what to set.
    missing = adit(*args, env=SECRETS | {"ADIT_ARCHIVE_PASSWORD": ""}, cwd=tmp_path)
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "ADIT_ARCHIVE_PASSWORD" in missing.stderr and ".env" in missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    assert not list((tmp_path / "downloads").glob("*.7z"))
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    result = adit(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "study 1: success" in result.stdout
    [archive] = (tmp_path / "downloads").glob("DOTENV-*.7z")
    with py7zr.SevenZipFile(archive, "r", password=SECRETS["ADIT_ARCHIVE_PASSWORD"]) as z:
        names = [n for n in z.getnames() if n.endswith(".dcm")]
    assert len(names) == spec.instance_count


def test_failed_studies_are_one_line_each_and_the_traceback_is_in_the_run_log(
        lab, prefect_server, tmp_path):
    """A source that does not answer: each study fails after its retries (Prefect logs the
    exception with its traceback); the terminal shows one line per study, nothing more."""
    nodes = nodes_file(lab, tmp_path, port=free_port(), timeout=2, retrieve=["c-get"])
    result = adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                  "--study", lab.demo[0].study_uid, "--study", lab.demo[1].study_uid,
                  "--nodes-file", str(nodes))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    lines = result.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["study 1: failure", "study 2: failure"]
    assert all("did not answer" in line for line in lines), lines
    hint = result.stderr.splitlines()
    assert len(hint) == 1 and hint[0].startswith("details: prefect flow-run logs "), hint
    run_id = hint[0].rsplit(" ", 1)[1]
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:  # logs reach the server in batches
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            if (any("Traceback" in log.message for log in logs)
                    and any("association refused" in log.message for log in logs)):
                break  # Prefect's traceback, and ADIT's own warnings, are in the run log
            assert time.monotonic() < deadline, [log.message[:200] for log in logs]
            time.sleep(0.5)


def test_an_unknown_study_prints_no_none(lab, prefect_server, tmp_path):
    spec = lab.demo[0]
    result = adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                  "--study", spec.study_uid, "--study", "1.2.3.4.5.6.7.8.9",
                  "--nodes-file", str(nodes_file(lab, tmp_path)))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "None" not in output
    assert result.stdout.splitlines() == [
        f"study 1: success  {spec.instance_count}/{spec.instance_count} instances",
        "study 2: failure  orthanc1: study not found"], output


def test_progress_bar_on_a_terminal(lab, prefect_server, tmp_path):
    """On a terminal the run's progress records (logger adit.progress) drive a bar."""
    primary, secondary = pty.openpty()
    try:
        result = adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                      "--study", lab.demo[0].study_uid, "--study", lab.demo[1].study_uid,
                      "--nodes-file", str(nodes_file(lab, tmp_path)), stderr=secondary)
        os.close(secondary)
        secondary = -1
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert result.returncode == 0, result.stdout + shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "transferring" in text and "100%" in text, text
