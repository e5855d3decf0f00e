"""The transfer flow on a real Prefect server: folders, PACS to PACS, retries and their absence."""

from __future__ import annotations

import pydicom
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.transfer import transfer_flow


def _task_runs(state) -> dict[str, int]:
    """Task run name -> how often it ran, for the flow run of `state`."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name: r.run_count for r in runs}


def test_transfer_to_folder_writes_every_instance_atomically(lab, prefect_server, tmp_path):
    spec = max(lab.demo, key=lambda s: s.instance_count)
    nodes = lab.nodes_file_in(tmp_path)
    state = transfer_flow("orthanc1", "downloads", [spec.study_uid], nodes_file=nodes,
                          return_state=True)
    rows = state.result()
    assert rows[0].status == "success"
    assert rows[0].transferred == rows[0].expected == spec.instance_count
    files = sorted((tmp_path / "downloads").rglob("*.dcm"))
    assert len(files) == spec.instance_count
    assert not list((tmp_path / "downloads").rglob("*.part"))
    first = files[0].relative_to(tmp_path / "downloads")
    assert first.parts[0] == spec.patient_id
    assert first.parts[1].startswith(f"{spec.study_date}-{spec.study_time}-")
    assert {pydicom.dcmread(f).StudyInstanceUID for f in files} == {spec.study_uid}


def test_transfer_pacs_to_pacs_by_c_move(lab, prefect_server, tmp_path):
    spec = lab.demo[-1]
    nodes = lab.nodes_file_in(tmp_path)
    state = transfer_flow("dcmqrscp", "orthanc2", [spec.study_uid], method="c-move",
                          nodes_file=nodes, return_state=True)
    rows = state.result()
    assert rows[0].status == "success", rows
    assert rows[0].transferred == spec.instance_count
    series = lab.orthanc2.client.get("/studies", params={"expand": 1}).json()
    assert spec.study_uid in {s["MainDicomTags"]["StudyInstanceUID"] for s in series}


def test_unknown_study_fails_at_once_without_retries(lab, prefect_server, tmp_path):
    nodes = lab.nodes_file_in(tmp_path)
    state = transfer_flow("orthanc1", "downloads", ["1.2.3.4.5.999"], nodes_file=nodes,
                          return_state=True)
    assert state.is_failed()
    rows = state.result(raise_on_failure=False)
    assert rows[0].status == "failure"
    assert "not found" in rows[0].message
    assert _task_runs(state) == {"study-1": 1}


def test_pacs_that_is_down_is_retried_then_reported(lab, prefect_server, tmp_path):
    from adit_tasks.lab.servers import free_port

    down = {"name": "down", "ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(),
            "timeout": 2}
    nodes = lab.nodes_file_in(tmp_path, down)
    state = transfer_flow("down", "downloads", [lab.ct.study_uid], nodes_file=nodes,
                          return_state=True)
    rows = state.result(raise_on_failure=False)
    assert rows[0].status == "failure"
    assert "down" in rows[0].message and "did not answer" in rows[0].message
    assert _task_runs(state) == {"study-1": 3}  # first try + retries: 2 in the lab's nodes file
