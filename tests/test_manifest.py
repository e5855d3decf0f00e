"""Per-job manifests and `adit verify`, on real transfers from the lab's Orthanc: a folder
delivery verified, then broken file by file (missing, changed, extra), re-run without
duplicate rows, rebuilt after its manifest was deleted; a pseudonymized archive whose manifest
holds no original identifier, with a wrong password and without a manifest."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from adit_tasks.core.archive import ArchiveWriter, read_entries
from adit_tasks.core.manifest import (
    ROW_FIELDS,
    CannotVerify,
    Job,
    JobManifest,
    Manifest,
    RunInfo,
    verify_folder,
)
from adit_tasks.core.options import TransferOptions as Options
from adit_tasks.core.sinks import FolderSink, StudyTarget
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, write_study
from deployments.cli import app
from flows.transfer import transfer_flow

SECRET = "manifest-test-secret"
PASSWORD = "manifest-pw-1"

# A marker patient of this file's own: none of it may appear in a pseudonymized manifest.
MARKER = StudySpec("QWVMAN-0815", "Qwvmanifest^Ilsabet", "19570302", "20050607", "081500",
                   "QWVACC01", "QWV thorax",
                   (SeriesSpec("CT", "qwv axial", 1, 2, 32, 32),
                    SeriesSpec("CT", "qwv coronal", 2, 2, 32, 32)))


@pytest.fixture(scope="module")
def marker(lab, tmp_path_factory) -> dict[str, list[str]]:
    """The marker study on orthanc1; its original SOP instance UIDs."""
    files = write_study(MARKER, tmp_path_factory.mktemp("marker"))
    lab.orthanc1.upload(files)
    return {"sop": [pydicom.dcmread(f).SOPInstanceUID for f in files]}


def adit_verify(path: Path, **env: str) -> tuple[int, str]:
    """`adit verify PATH` as the CLI runs it (in-process); exit code and output."""
    result = CliRunner().invoke(app, ["verify", str(path)],
                                env={"ADIT_ARCHIVE_PASSWORD": None, **env})
    return result.exit_code, result.output


def manifest_of(downloads: Path) -> tuple[Path, dict]:
    [path] = list((downloads / "manifests").glob("*.json"))
    return path, json.loads(path.read_text("utf-8"))


def test_folder_delivery_verified_then_each_difference_found_and_reruns_merge(
        lab, prefect_server, tmp_path, marker):
    downloads = tmp_path / "downloads"
    nodes = lab.nodes_file_in(tmp_path)
    # A study that fails (unknown to the PACS): the manifest is written all the same.
    studies = [MARKER.study_uid, "1.2.3.4.5.999"]

    def run() -> list:
        return transfer_flow("orthanc1", "downloads", studies, nodes_file=nodes,
                             return_state=True).result(raise_on_failure=False)

    assert [r.status for r in run()] == ["success", "failure"]
    path, doc = manifest_of(downloads)
    files = sorted(downloads.glob("*/*/*/*.dcm"))
    assert len(files) == MARKER.instance_count == len(doc["rows"])
    header = doc["header"]
    assert path.stem == header["job"] and header["job"].startswith("adit-")
    assert header["source"] == "orthanc1" and header["destination"] == "downloads"
    assert header["flow_run_name"] == "transfer-orthanc1-to-downloads" and header["flow_run_id"]
    assert header["options"]["pseudonymize"] is False
    assert header["deidentification_method_codes"] == []
    row = doc["rows"][0]
    on_disk = pydicom.dcmread(downloads / row["path"])
    assert (row["study_uid"], row["series_uid"], row["sop_instance_uid"], row["kind"]) == (
        MARKER.study_uid, on_disk.SeriesInstanceUID, on_disk.SOPInstanceUID, "dicom")
    assert row["size"] == (downloads / row["path"]).stat().st_size
    csv_lines = path.with_suffix(".csv").read_text("utf-8-sig").splitlines()
    assert csv_lines[0] == ",".join(ROW_FIELDS) and len(csv_lines) == 1 + len(files)
    assert adit_verify(downloads) == (
        0, f"verified: {len(files)} file(s) listed in 1 manifest(s), all present and "
           "unchanged\n")

    changed, deleted = files[0], files[1]
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte of pixel data
    changed.write_bytes(bytes(data))
    deleted.unlink()
    stray = files[2].parent / "notes.txt"
    stray.write_text("not ADIT's")
    (files[2].parent / ".half-written.dcm.part").write_bytes(b"x")  # ADIT's temporary: ignored
    code, out = adit_verify(downloads)
    rel = lambda p: p.relative_to(downloads).as_posix()  # noqa: E731
    assert code == 1
    assert out.splitlines()[:3] == [f"missing: {rel(deleted)}", f"changed: {rel(changed)}",
                                    f"extra: {rel(stray)}"]
    assert "not verified: 1 missing, 1 changed, 1 extra" in out

    # Re-run: the deleted instance comes back; the changed one is present, so it is skipped
    # and keeps its row (still reported); one row per file, the runs listed.
    assert [r.status for r in run()] == ["success", "failure"]
    _, again = manifest_of(downloads)
    paths = [r["path"] for r in again["rows"]]
    assert len(paths) == len(set(paths)) == MARKER.instance_count
    assert len(again["header"]["runs"]) == 2
    report = verify_folder(downloads)
    assert (report.missing, report.changed, report.extra) == ((), (rel(changed),), (rel(stray),))

    # Manifest deleted: the next run rebuilds the rows of the files present from the disk.
    for manifest in (downloads / "manifests").iterdir():
        manifest.unlink()
    stray.unlink()
    changed.write_bytes(bytes(data))  # accepted as it is now: ADIT counts it as present
    run()
    _, rebuilt = manifest_of(downloads)
    assert sorted(r["path"] for r in rebuilt["rows"]) == paths
    assert len(rebuilt["header"]["runs"]) == 1
    assert adit_verify(downloads)[0] == 0


def test_a_manifest_that_cannot_be_written_turns_successes_into_warnings(
        lab, prefect_server, tmp_path, marker):
    """The files arrived but the recipient could not prove it: the study is not a plain
    success, its message says why, and nothing that arrived is lost."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "manifests").write_text("a file where the manifests folder should be")
    [result] = transfer_flow("orthanc1", "downloads", [MARKER.study_uid],
                             nodes_file=lab.nodes_file_in(tmp_path),
                             return_state=True).result(raise_on_failure=False)
    assert result.status == "warning"
    assert "manifest could not be written" in result.message
    assert len(list(downloads.glob("*/*/*/*.dcm"))) == MARKER.instance_count


def test_pseudonymized_archive_manifest_verified_with_its_password_only(
        lab, prefect_server, tmp_path, marker, monkeypatch):
    monkeypatch.setenv("ADIT_PSEUDONYM_SECRET", SECRET)
    monkeypatch.setenv("ADIT_ARCHIVE_PASSWORD", PASSWORD)
    rows = transfer_flow("orthanc1", "downloads", [MARKER.study_uid],
                         options=Options(archive=True, trial_id="TRIAL-M"),
                         nodes_file=lab.nodes_file_in(tmp_path), return_state=True).result()
    assert rows[0].status == "success", rows
    [archive] = list((tmp_path / "downloads").glob("*.7z"))
    assert not (tmp_path / "downloads" / "manifests").exists()  # the archive holds it
    entries, kept = read_entries(archive, PASSWORD,
                                 keep=frozenset({"manifest.json", "manifest.csv"}))
    manifest = Manifest.from_json(kept["manifest.json"], "manifest.json")
    assert {r.path for r in manifest.rows} == set(entries) - {"manifest.json", "manifest.csv"}
    assert len(manifest.rows) == MARKER.instance_count
    assert {r.study_uid for r in manifest.rows} == {rows[0].destination_study_uid}
    assert manifest.header["job"] == archive.stem
    codes = [c["code_value"] for c in manifest.header["deidentification_method_codes"]]
    assert codes == ["113100", "113105", "113107"]  # basic, clean descriptors, modified dates

    # No original identifier in either file, in any spelling the manifest could use.
    originals = [MARKER.patient_id, MARKER.accession, MARKER.birth_date, MARKER.study_date,
                 "Qwvmanifest", "Ilsabet", MARKER.study_description, "qwv axial", MARKER.study_uid,
                 *(MARKER.series_uid(s) for s in MARKER.series), *marker["sop"]]
    for name in ("manifest.json", "manifest.csv"):
        text = kept[name].decode("utf-8-sig").lower()
        assert not [v for v in originals if v.lower() in text], name

    assert adit_verify(archive, ADIT_ARCHIVE_PASSWORD=PASSWORD)[0] == 0
    code, out = adit_verify(archive, ADIT_ARCHIVE_PASSWORD="wrong")
    assert code == 2 and "wrong password" in out
    code, out = adit_verify(archive)  # no password and no terminal to ask on
    assert code == 2 and "password is needed" in out

    # An archive without a manifest (not written by ADIT, or older): cannot verify.
    bare = ArchiveWriter(tmp_path / "bare.7z", PASSWORD)
    bare.add("P/s/1-CT/x.dcm", b"data")
    code, out = adit_verify(bare.finish(), ADIT_ARCHIVE_PASSWORD=PASSWORD)
    assert code == 2 and "holds no manifest.json" in out


def test_folder_without_manifest_or_with_a_hostile_one_cannot_be_verified(tmp_path):
    (tmp_path / "P1" / "s" / "1-CT").mkdir(parents=True)
    (tmp_path / "P1" / "s" / "1-CT" / "a.dcm").write_bytes(b"x")
    code, out = adit_verify(tmp_path)
    assert code == 2 and "no manifest" in out
    # A manifest is input from whoever handed over the folder: a path leaving it is refused
    # before anything is compared.
    (tmp_path / "manifests").mkdir()
    row = {"study_uid": "1.2", "series_uid": "1.2.3", "sop_instance_uid": "1.2.3.4",
           "path": "../../etc/passwd", "size": 1, "sha256": "0" * 64, "kind": "dicom"}
    (tmp_path / "manifests" / "job.json").write_text(json.dumps(
        {"format": "adit-manifest/1", "header": {}, "rows": [row]}))
    with pytest.raises(CannotVerify, match="row 1: field 'path'"):
        verify_folder(tmp_path)
    assert adit_verify(tmp_path)[0] == 2


def test_files_added_beside_instances_are_listed_with_their_kind(tmp_path):
    """The contract of `FileSink.add_file` (NIfTI volumes, sidecars): each file gets a row of
    its kind, verified like the instances; an unknown kind fails before anything is written."""
    job = Job("adit-0123456789ab", "pacs", "downloads", {"archive": False})
    manifest = JobManifest(job, tmp_path)
    sink = FolderSink(tmp_path, manifest)
    study = StudyTarget("2.25.1", Path("P1") / "20200101-2.25.1", pseudonymized=True)
    sink.add_file(study, Path("nifti") / "1-CT.nii.gz", b"volume", series_uid="2.25.2",
                  kind="nifti")
    sink.add_file(study, Path("nifti") / "1-CT.json", b"{}", series_uid="2.25.2",
                  kind="sidecar")
    with pytest.raises(ValueError, match="unknown kind"):
        sink.add_file(study, Path("x.bin"), b"x", kind="volume")
    assert not (tmp_path / study.folder / "x.bin").exists()
    manifest.write_to_folder(RunInfo("id-1", "transfer-pacs-to-downloads", "2026-12-02T00:00"))
    rows = Manifest.from_json((tmp_path / "manifests" / f"{job.key}.json").read_bytes(),
                              "test").rows
    assert [(r.path, r.kind, r.series_uid, r.size) for r in rows] == [
        ("P1/20200101-2.25.1/nifti/1-CT.json", "sidecar", "2.25.2", 2),
        ("P1/20200101-2.25.1/nifti/1-CT.nii.gz", "nifti", "2.25.2", 6)]
    assert verify_folder(tmp_path).ok
    (tmp_path / study.folder / "nifti" / "1-CT.json").write_bytes(b"[]")
    assert verify_folder(tmp_path).changed == ("P1/20200101-2.25.1/nifti/1-CT.json",)


def test_two_runs_of_one_job_writing_at_once_lose_no_rows(tmp_path):
    """Runs of the same job that end together (a re-run started while the first finishes)
    merge into its manifest one after the other: every run's files are listed."""
    job = Job("adit-0123456789ab", "pacs", "downloads", {"archive": False})
    runs = 8
    manifests = []
    for n in range(runs):
        manifest = JobManifest(job, tmp_path)
        sink = FolderSink(tmp_path, manifest)
        study = StudyTarget(f"2.25.{n}", Path("P1") / f"study-{n}", pseudonymized=True)
        for i in range(20):
            sink.add_file(study, Path(f"{i}.bin"), bytes([n, i]) * 1000, kind="file")
        manifests.append(manifest)
    barrier = threading.Barrier(runs)

    def write(manifest: JobManifest, n: int) -> None:
        barrier.wait()
        manifest.write_to_folder(RunInfo(f"id-{n}", "transfer", "2026-12-02T00:00"))

    threads = [threading.Thread(target=write, args=(m, n)) for n, m in enumerate(manifests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = Manifest.from_json((tmp_path / "manifests" / f"{job.key}.json").read_bytes(),
                              "test").rows
    assert len(rows) == runs * 20
    assert verify_folder(tmp_path).ok


def test_job_key_names_the_output_not_the_schedule() -> None:
    """A re-run with another window or --urgent finds the same archive and manifest; a job
    whose output differs gets its own."""
    from adit_tasks.core.options import TransferOptions
    from adit_tasks.core.plan import job_key
    from adit_tasks.core.results import StudyJob

    jobs = [StudyJob("1.2.3", (), "")]
    key = job_key(TransferOptions(archive=True), jobs)
    assert job_key(TransferOptions(archive=True, urgent=True,
                                   window="Mon-Fri 20:00-06:00"), jobs) == key
    assert job_key(TransferOptions(archive=True, pseudonymize=True), jobs) != key
    assert job_key(TransferOptions(archive=True), [StudyJob("1.2.4", (), "")]) != key
