"""The study picker: a paused flow run whose form lists the studies found, resumed by API."""

from __future__ import annotations

import threading

import pydicom
import yaml
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from adit_tasks.core.options import StudySearch
from flows.selective_transfer import selective_transfer_flow
from tests import records


def wait_for_paused_run(name: str):
    with get_client(sync_client=True) as client:
        return records.wait_for_paused_run(client, name, timeout=60)


def test_picked_studies_and_only_those_arrive(lab, prefect_server, tmp_path):
    patient = next(s.patient_id for s in lab.demo
                   if sum(x.patient_id == s.patient_id for x in lab.demo) >= 2)
    studies = [s for s in lab.demo if s.patient_id == patient]
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        state=selective_transfer_flow.with_options(flow_run_name="picker-test")(
            "orthanc1", "downloads", search=StudySearch(patient_id=patient),
            nodes_file=lab.nodes_file_in(tmp_path), return_state=True)))
    runner.start()
    run = wait_for_paused_run("picker-test")
    keyset = run.state.state_details.run_input_keyset
    with get_client(sync_client=True) as client:
        schema = client.read_flow_run_input(run.id, keyset["schema"])
        description = client.read_flow_run_input(run.id, keyset["description"])
    labels = yaml.safe_load(schema)["properties"]["studies"]["items"]["enum"]
    assert len(labels) == len(studies)
    for spec in studies:
        assert spec.study_description in description
        assert spec.accession in description
    chosen = labels[0]
    resume_flow_run(run.id, run_input={"studies": [chosen], "destination": "downloads"})
    runner.join(120)
    results = result["state"].result()
    assert [r.status for r in results] == ["success"]
    files = list((tmp_path / "downloads").rglob("*.dcm"))
    got = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}
    assert len(got) == 1
    picked = next(s for s in studies if s.study_uid in got)
    assert len(files) == picked.instance_count


def test_no_match_ends_with_a_clear_message(lab, prefect_server, tmp_path):
    state = selective_transfer_flow("orthanc1", "downloads",
                                    search=StudySearch(patient_id="NOBODY-HERE"),
                                    nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    assert state.is_completed() and "No studies match" in state.message


def test_too_many_results_asks_to_narrow_the_search(lab, prefect_server, tmp_path):
    state = selective_transfer_flow("orthanc1", "downloads", limit=2,
                                    nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    assert state.is_completed() and "narrow the search" in state.message


def test_unanswered_form_times_out_and_transfers_nothing(lab, prefect_server, tmp_path):
    state = selective_transfer_flow("orthanc1", "downloads",
                                    search=StudySearch(patient_id=lab.ct.patient_id),
                                    timeout_minutes=0.05, nodes_file=lab.nodes_file_in(tmp_path),
                                    return_state=True)
    assert state.is_completed() and "Nobody chose" in state.message
    assert not (tmp_path / "downloads").exists()
