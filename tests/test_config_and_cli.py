"""The nodes file and the `adit` command line, run as a user would (a subprocess)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adit_tasks.core.config import load_settings
from adit_tasks.core.errors import ConfigError

GOOD_NODE = "  - name: pacs1\n    ae_title: PACS1\n    host: 127.0.0.1\n    port: 11112\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,fragments", [
    ("nodes:\n" + GOOD_NODE + "    colour: red\n", ["node 'pacs1'", "'colour'", "unknown key"]),
    ("nodes:\n  - name: pacs2\n    host: 127.0.0.1\n    port: 1\n",
     ["node 'pacs2'", "ae_title, host and port"]),
    ("nodes:\n  - name: pacs3\n    ae_title: THIS_IS_WAY_TOO_LONG\n    host: h\n    port: 1\n",
     ["node 'pacs3'", "'ae_title'", "longer than 16"]),
    ("nodes:\n" + GOOD_NODE + GOOD_NODE, ["duplicate node name 'pacs1'"]),
    ("nodes:\n  - name: web\n    dicomweb_url: ftp://x\n", ["node 'web'", "'dicomweb_url'"]),
    ("ae_title: ''\n", ["'ae_title'", "empty"]),
    ("nodes: [\n", ["not valid YAML"]),
])
def test_bad_nodes_file_names_file_node_and_field(tmp_path, text, fragments) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_environment_overrides_the_file(tmp_path, monkeypatch) -> None:
    path = _write(tmp_path, "ae_title: FROMFILE\nreceiver_port: 1234\nnodes:\n" + GOOD_NODE)
    monkeypatch.setenv("ADIT_AE_TITLE", "FROMENV")
    settings = load_settings(path)
    assert settings.ae_title == "FROMENV"
    assert settings.receiver_port == 1234
    assert settings.server("pacs1").retrieve == ["c-get", "c-move"]


def _adit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True,
                          text=True, timeout=180, env=full_env)


def test_cli_nodes_and_echo(lab) -> None:
    nodes = _adit("nodes", "--nodes-file", str(lab.nodes_file))
    assert nodes.returncode == 0, nodes.stderr
    assert "orthanc1" in nodes.stdout and "downloads" in nodes.stdout
    ok = _adit("echo", "orthanc1", "--nodes-file", str(lab.nodes_file))
    assert ok.returncode == 0, ok.stderr


def test_cli_exit_codes(lab, tmp_path) -> None:
    unknown = _adit("echo", "nope", "--nodes-file", str(lab.nodes_file))
    assert unknown.returncode == 2 and "unknown node 'nope'" in unknown.stderr
    bad = _write(tmp_path, "nodes:\n" + GOOD_NODE + "    colour: red\n")
    assert _adit("nodes", "--nodes-file", str(bad)).returncode == 2
    date = _adit("query", "orthanc1", "--study-date", "soon", "--nodes-file",
                 str(lab.nodes_file))
    assert date.returncode == 2, date.stderr
    assert "--study-date: invalid study date (4 characters)" in date.stderr
    assert "soon" not in date.stderr
    level = _adit("query", "orthanc1", "--level", "image", "--nodes-file", str(lab.nodes_file))
    assert level.returncode == 2
    down = tmp_path / "down.yaml"
    from adit_tasks.lab.servers import free_port

    down.write_text(f"nodes:\n  - name: down\n    ae_title: X\n    host: 127.0.0.1\n"
                    f"    port: {free_port()}\n    timeout: 2\n")
    failed = _adit("echo", "down", "--nodes-file", str(down))
    assert failed.returncode == 1 and "did not answer" in failed.stderr


@pytest.mark.parametrize("level", ["study", "series"])
def test_cli_query_writes_csv(lab, tmp_path, level) -> None:
    out = tmp_path / "result.csv"
    spec = lab.demo[0]
    result = _adit("query", "dcmqrscp", "--patient-id", spec.patient_id, "--level", level,
                   "--out", str(out), "--nodes-file", str(lab.nodes_file))
    assert result.returncode == 0, result.stderr
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    study_uids = {s.study_uid for s in lab.demo if s.patient_id == spec.patient_id}
    assert {r["StudyInstanceUID"] for r in rows} == study_uids
    assert list(rows[0])[:4] == ["PatientID", "PatientName", "PatientBirthDate", "StudyDate"]
    if level == "series":
        assert "SeriesInstanceUID" in rows[0] and "Modality" in rows[0]
        assert len(rows) == sum(len(s.series) for s in lab.demo if s.patient_id == spec.patient_id)
    else:
        assert all(int(r["NumberOfStudyRelatedInstances"]) > 0 for r in rows)


def test_cli_transfer_to_folder(lab, prefect_server, tmp_path) -> None:
    spec = lab.demo[0]
    result = _adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                   "--study", spec.study_uid, "--nodes-file", str(lab.nodes_file),
                   env={"PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr
    assert "success" in result.stdout
    written = list((lab.root / "downloads" / spec.patient_id).rglob("*.dcm"))
    assert len(written) == spec.instance_count
    bad = _adit("transfer", "--source", "orthanc1", "--destination", "downloads",
                "--study", "1.2.abc", "--nodes-file", str(lab.nodes_file))
    assert bad.returncode == 2
