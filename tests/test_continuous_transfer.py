"""Continuous transfer over a generated two-year archive of 300 studies, with a fixed clock:
the backlog completes over several runs, late and new studies are picked up, a study that
grows is completed, a crash in the middle loses and duplicates nothing, failures are retried.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pydicom
import pytest
import yaml

from adit_tasks.core import windows
from adit_tasks.core.manifest import verify_folder
from adit_tasks.core.plan import standing_job_key
from adit_tasks.lab.servers import OrthancServer
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, make_study, write_study
from flows import continuous as continuous_module
from flows.continuous import continuous_transfer_flow

TODAY = dt.datetime(2026, 6, 30, 12, 0)
START = "2024-07-01"
DESCRIPTIONS = ["CT Thorax nativ", "CT Chest low dose", "CT Abdomen", "MRT Knie", "CT Schaedel"]


def spec(n: int, day: dt.date, description: str, instances: int = 1) -> StudySpec:
    modality = "MR" if description.startswith("MRT") else "CT"
    return StudySpec(f"CONT{n:04d}", f"Cont^Patient{n}", "19600101", day.strftime("%Y%m%d"),
                     "083000", f"ACCC{n:05d}", description,
                     (SeriesSpec(modality, "main", 1, instances, 16, 16),))


def wanted(s: StudySpec) -> bool:  # the job's filter: CT, description thorax or chest
    d = s.study_description.lower()
    return "thorax" in d or "chest" in d


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    rng = random.Random(3)
    first = dt.date.fromisoformat(START)
    specs = [spec(n, first + dt.timedelta(days=rng.randrange(0, 730)), rng.choice(DESCRIPTIONS))
             for n in range(300)]
    files = [p for s in specs for p in write_study(s, root / "files")]
    server = OrthancServer(root / "source", ae_title="CONTSRC", dicomweb=False).start()
    try:
        server.upload(files)
        # What the job must deliver: StudyInstanceUID -> instances (tests that add add here).
        expected = {s.study_uid: s.instance_count for s in specs if wanted(s)}
        yield server, specs, root, expected
    finally:
        server.stop()


@pytest.fixture
def job(archive, tmp_path, monkeypatch, prefect_server, request):
    server, _specs, _root, expected = archive
    monkeypatch.setattr(windows, "clock", lambda: TODAY)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"nodes": [
        {"name": "clinical", "ae_title": server.ae_title, "host": "127.0.0.1",
         "port": server.dicom_port, "max_associations": 2},
        {"name": "research", "path": str(tmp_path / "research")}]}))

    def run(**kw):
        params = dict(job=request.node.name, source="clinical", destination="research",
                      start_date=START, modality="CT", study_description="/thorax|chest/",
                      chunk_days=30, max_studies_per_run=25, nodes_file=str(nodes))
        return continuous_transfer_flow(**(params | kw), return_state=True)

    return run, server, expected, tmp_path / "research"


def arrived(research: Path) -> dict[str, int]:
    """StudyInstanceUID -> number of files, at the destination."""
    counts: dict[str, int] = {}
    for f in research.rglob("*.dcm"):
        uid = pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
        counts[uid] = counts.get(uid, 0) + 1
    return counts


def until_done(run, limit: int = 12) -> list[dict]:
    results = []
    for _ in range(limit):
        results.append(run().result(raise_on_failure=False))
        if results[-1]["backlog_days"] == 0 and results[-1]["failed_total"] == 0:
            return results
    raise AssertionError(f"backlog not done after {limit} runs: {results[-1]}")


def test_backlog_over_several_runs_then_new_late_and_growing_studies(job, archive, request):
    run, server, expected, research = job
    job_name = request.node.name
    results = until_done(run)
    assert len(results) >= 3, "the budget of 25 studies per run should need several runs"
    assert arrived(research) == expected
    assert sum(r["transferred"] for r in results) == len(expected)  # each study once

    # New studies: one of today, one filed late under a date two weeks ago (overlap), one
    # filed late under a date a year ago (found by the round-robin re-check of history).
    today, recent, old = (spec(900, TODAY.date(), "CT Thorax nativ"),
                          spec(901, TODAY.date() - dt.timedelta(days=2), "CT Chest"),
                          spec(902, TODAY.date() - dt.timedelta(days=365), "CT Thorax"))
    server.upload([p for s in (today, recent, old) for p in write_study(s, research.parent /
                                                                        "late")])
    # A study that grows: one more instance for a transferred study of the last days.
    grow = spec(903, TODAY.date() - dt.timedelta(days=1), "CT Thorax nativ", instances=1)
    server.upload(write_study(grow, research.parent / "grow1"))
    later = [run().result()]
    extra = next(iter(make_study(StudySpec(*[getattr(grow, f) for f in (
        "patient_id", "patient_name", "birth_date", "study_date", "study_time", "accession",
        "study_description")], (SeriesSpec("CT", "main", 2, 1, 16, 16),)))))
    path = research.parent / "grow2.dcm"
    extra.save_as(path, enforce_file_format=True)
    server.upload([path])
    for _ in range(26):  # the re-check goes through 24 months of history, a month a run
        result = run().result()
        later.append(result)
        if old.study_uid in arrived(research):
            break
    counts = arrived(research)
    assert counts[today.study_uid] == 1 and counts[recent.study_uid] == 1
    assert counts[grow.study_uid] == 2, "the study that grew got its new instance"
    assert counts[old.study_uid] == 1, "the late study under an old date was found"
    assert result["failed_total"] == 0
    # history 2024-07-01 .. 2026-06-26 (3 days of overlap before today): 726 days, 25 chunks
    # of 30 days, one re-checked per run
    assert result["runs_per_recheck_cycle"] == 25
    expected |= {today.study_uid: 1, recent.study_uid: 1, grow.study_uid: 2, old.study_uid: 1}
    assert counts == expected
    # The job's manifests in one folder of their own, one pair per run that had studies to
    # look at (not one per chunk), and together they list every file.
    job_folder = Path(standing_job_key(job_name, "x")).parent.name
    assert [p.name for p in (research / "manifests").iterdir()] == [job_folder]
    written = sorted((research / "manifests" / job_folder).iterdir())
    with_studies = sum(1 for r in results + later if r["found"] or r["rechecked"])
    assert len(written) == 2 * with_studies and with_studies <= len(results + later)
    report = verify_folder(research)
    assert report.ok and report.files == sum(expected.values())


def test_crash_in_the_middle_loses_and_duplicates_nothing(job, monkeypatch):
    run, _server, expected, research = job
    real = continuous_module.transfer_jobs
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(continuous_module, "transfer_jobs", crashing)
    crashed = run()
    assert crashed.is_failed()
    monkeypatch.setattr(continuous_module, "transfer_jobs", real)
    until_done(run)
    assert arrived(research) == expected


def test_failed_study_is_retried_next_run_not_dropped(job, monkeypatch):
    run, _server, expected, research = job
    victim_uid = next(iter(expected))
    from adit_tasks import tasks
    from adit_tasks.core.errors import OperationFailed

    real = tasks.transfer_study

    def failing(plan, job):
        if job.study_uid == victim_uid:
            raise OperationFailed("simulated refusal")
        return real(plan, job)

    monkeypatch.setattr(tasks, "transfer_study", failing)
    first = run(max_studies_per_run=1000).result(raise_on_failure=False)
    assert first["failed"] == 1 and first["failed_total"] == 1
    assert victim_uid not in arrived(research)
    monkeypatch.setattr(tasks, "transfer_study", real)
    second = run(max_studies_per_run=1000).result()
    assert second["retried"] == 1 and second["failed_total"] == 0
    assert arrived(research) == expected
