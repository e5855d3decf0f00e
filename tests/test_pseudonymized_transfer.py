"""Transfers with pseudonymization, to folders, archives and PACS, against the real servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import py7zr
import pydicom
import pytest

from adit_tasks.core import find
from adit_tasks.core.options import TransferOptions as Options
from flows.transfer import transfer_flow

SECRET = "test-secret-do-not-use"
PASSWORD = "archive-pw-123"


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("ADIT_PSEUDONYM_SECRET", SECRET)
    monkeypatch.setenv("ADIT_ARCHIVE_PASSWORD", PASSWORD)



def identifying_values(spec) -> list[str]:
    """What must never appear in pseudonymized output (names, IDs, dates, accession)."""
    parts = [p for p in spec.patient_name.replace("^", " ").split() if len(p) >= 3]
    return [spec.patient_id, spec.accession, spec.birth_date, spec.study_date,
            spec.study_uid, *parts]


def assert_no_leak(values: list[str], blob: bytes, where: str) -> None:
    for value in values:
        for encoding in ("latin-1", "utf-8"):
            needle = value.encode(encoding, "ignore")
            assert needle not in blob, f"{value!r} ({encoding}) found in {where}"


def test_pseudonymized_folder_has_no_original_value_anywhere(lab, prefect_server, tmp_path,
                                                             secrets):
    spec = max(lab.demo, key=lambda s: s.instance_count)
    state = transfer_flow("orthanc1", "downloads", [spec.study_uid],
                          options=Options(trial_id="TRIAL-7", trial_name="Lung Study"),
                          nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    rows = state.result()
    assert rows[0].status == "success", rows
    pseudonym = rows[0].pseudonym
    files = sorted((tmp_path / "downloads").rglob("*.dcm"))
    assert len(files) == spec.instance_count
    values = identifying_values(spec)
    for path in files:
        rel = str(path.relative_to(tmp_path / "downloads"))
        free_text = [spec.study_description, *(s.description for s in spec.series)]
        assert_no_leak(values + free_text, rel.encode(), rel)
        assert_no_leak(values, path.read_bytes(), rel)
        ds = pydicom.dcmread(path)
        assert ds.PatientID == ds.PatientName == ds.ClinicalTrialSubjectID == pseudonym
        assert ds.ClinicalTrialProtocolID == "TRIAL-7"
        assert ds.ClinicalTrialProtocolName == "Lung Study"
        assert ds.PatientIdentityRemoved == "YES"
        assert not [e for e in ds.iterall() if e.tag.is_private]
    assert rel.split("/")[0] == pseudonym


def test_pseudonymized_pacs_to_pacs_then_rerun_transfers_nothing(lab, prefect_server,
                                                                 tmp_path, secrets):
    spec = lab.demo[0]
    nodes = lab.nodes_file_in(tmp_path)
    first = transfer_flow("dcmqrscp", "orthanc2", [spec.study_uid],
                          options=Options(pseudonym="SUBJ-001"), method="c-move",
                          nodes_file=nodes, return_state=True).result()
    assert first[0].status == "success", first
    assert first[0].transferred == spec.instance_count
    new_uid = first[0].destination_study_uid
    assert new_uid != spec.study_uid
    landed = find.manifest(lab.connection("orthanc2"), new_uid)
    assert len(landed) == spec.instance_count
    # Same job again: deterministic UIDs, so the destination is known to be complete.
    again = transfer_flow("dcmqrscp", "orthanc2", [spec.study_uid],
                          options=Options(pseudonym="SUBJ-001"), method="c-move",
                          nodes_file=nodes, return_state=True).result()
    assert again[0].transferred == 0
    assert again[0].skipped == spec.instance_count
    assert again[0].destination_study_uid == new_uid
    assert len(find.manifest(lab.connection("orthanc2"), new_uid)) == spec.instance_count


def test_archive_opens_with_password_only_and_hides_names(lab, prefect_server, tmp_path,
                                                          secrets):
    specs = lab.demo[:2]
    state = transfer_flow("orthanc1", "downloads", [s.study_uid for s in specs],
                          options=Options(archive=True, trial_id="ARCH"),
                          nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    rows = state.result()
    assert [r.status for r in rows] == ["success", "success"]
    archives = list((tmp_path / "downloads").glob("*.7z"))
    assert len(archives) == 1 and archives[0].name.startswith("ARCH-")
    assert not list((tmp_path / "downloads").glob(".*.part"))
    with py7zr.SevenZipFile(archives[0], "r", password=PASSWORD) as z:
        names = z.getnames()
        extracted = tmp_path / "x"
        z.extractall(extracted)
    dcm = [n for n in names if n.endswith(".dcm")]
    assert len(dcm) == sum(s.instance_count for s in specs)
    blob = archives[0].read_bytes()
    for name in dcm[:5]:
        assert Path(name).stem.encode() not in blob  # header encryption hides file names
    for spec in specs:
        assert_no_leak(identifying_values(spec), blob, "archive")
    # py7zr raises different errors for these (PasswordRequired, CRC, LZMA errors).
    with pytest.raises(Exception), py7zr.SevenZipFile(archives[0], "r") as z:  # noqa: B017
        z.getnames()
    with pytest.raises(Exception), py7zr.SevenZipFile(  # noqa: B017
            archives[0], "r", password="wrong") as z:
        z.extractall(tmp_path / "y")
    assert not list((tmp_path / "y").rglob("*.dcm"))
    first = pydicom.dcmread(next(extracted.rglob("*.dcm")))
    assert first.PatientIdentityRemoved == "YES"
    # Re-running the same job finds the archive complete and does nothing.
    again = transfer_flow("orthanc1", "downloads", [s.study_uid for s in specs],
                          options=Options(archive=True, trial_id="ARCH"),
                          nodes_file=lab.nodes_file_in(tmp_path), return_state=True).result()
    assert all("already complete" in r.message for r in again)
    assert len(list((tmp_path / "downloads").glob("*.7z"))) == 1


def test_compressed_instances_keep_syntax_and_pixels_when_pseudonymized(lab, prefect_server,
                                                                        tmp_path, secrets):
    originals = {pydicom.dcmread(p).StudyInstanceUID: pydicom.dcmread(p) for p in lab.samples}
    state = transfer_flow("orthanc1", "downloads", list(originals),
                          options=Options(pseudonymize=True),
                          nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    assert all(r.status == "success" for r in state.result())
    by_pixels = {pydicom.dcmread(f).PixelData: pydicom.dcmread(f)
                 for f in (tmp_path / "downloads").rglob("*.dcm")}
    for original in originals.values():
        got = by_pixels.get(original.PixelData)
        assert got is not None, "pixel data changed"
        assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_burned_in_images_are_skipped_with_a_warning(lab, prefect_server, tmp_path, secrets):
    spec = lab.burned_in
    rows = transfer_flow("orthanc1", "downloads", [spec.study_uid],
                         options=Options(pseudonymize=True),
                         nodes_file=lab.nodes_file_in(tmp_path), return_state=True).result()
    assert rows[0].status == "warning"
    assert rows[0].skipped == 1 and rows[0].transferred == spec.instance_count - 1
    assert "burned-in" in rows[0].message
    assert len(list((tmp_path / "downloads").rglob("*.dcm"))) == spec.instance_count - 1


def test_stow_rs_destination(lab, prefect_server, tmp_path, secrets):
    web = {"name": "web", "dicomweb_url": lab.orthanc1.dicomweb_url}
    spec = lab.demo[1]
    rows = transfer_flow("dcmqrscp", "web", [spec.study_uid],
                         options=Options(pseudonym="WEB-1"),
                         nodes_file=lab.nodes_file_in(tmp_path, web),
                         return_state=True).result()
    assert rows[0].status == "success", rows
    new_uid = rows[0].destination_study_uid
    assert len(find.manifest(lab.connection("orthanc1"), new_uid)) == spec.instance_count


def test_transfer_killed_halfway_then_rerun_completes_without_duplicates(lab, prefect_server,
                                                                        tmp_path):
    nodes = lab.nodes_file_in(tmp_path)
    downloads = tmp_path / "downloads"
    env = {**os.environ, "PREFECT_API_URL": prefect_server,
           "ADIT_PSEUDONYM_SECRET": SECRET}
    cmd = [sys.executable, "-m", "deployments.cli", "transfer", "--source", "orthanc1",
           "--destination", "downloads", "--study", lab.ct.study_uid, "--pseudonymize",
           "--nodes-file", nodes]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(downloads.rglob("*.dcm"))) < 20:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    halfway = list(downloads.rglob("*.dcm"))
    assert 20 <= len(halfway) < 150, "the kill should land in the middle of the study"
    for path in halfway:  # every file under a final name is complete
        pydicom.dcmread(path).PixelData  # noqa: B018
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    files = list(downloads.rglob("*.dcm"))
    assert len(files) == 150
    assert len({pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                for f in files}) == 150
