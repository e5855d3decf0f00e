"""What an operator reads in the logs of a transfer: associations, counts, refusals, and no
patient data (the study's patient name, ID and birth date never appear)."""

from __future__ import annotations

import logging

import pytest

from flows.transfer import transfer_flow


def _patient_values(spec) -> list[str]:
    family = spec.patient_name.split("^")[0]
    return [spec.patient_id, spec.patient_name, family, spec.birth_date, spec.accession]


@pytest.mark.parametrize("destination,method", [("downloads", "c-get"),
                                                ("orthanc2", "c-move")])
def test_transfer_logs_associations_and_counts_without_patient_data(
        lab, prefect_server, tmp_path, caplog, destination, method) -> None:
    spec = lab.demo[0]
    caplog.set_level(logging.DEBUG, logger="adit_tasks")
    state = transfer_flow("orthanc1", destination, [spec.study_uid], method=method,
                          nodes_file=lab.nodes_file_in(tmp_path), return_state=True)
    assert state.result()[0].status == "success"
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("adit_tasks"))
    assert "orthanc1: association opened" in text
    assert "orthanc1: association released" in text
    assert f"{method.upper()} delivered {spec.instance_count} instances" in text
    assert f"study complete at the destination: {spec.instance_count} sent" in text
    for value in _patient_values(spec):
        assert value not in text, "patient data in the operator log"


def test_failed_association_is_logged_by_kind_only(lab, prefect_server, tmp_path,
                                                   caplog) -> None:
    """A destination that does not answer: the log says the association failed and why in
    kind, without any study or patient value."""
    from adit_tasks.lab.servers import free_port

    wrong = {"name": "stranger", "ae_title": "NOBODY", "host": "127.0.0.1",
             "port": free_port(), "timeout": 2}
    caplog.set_level(logging.DEBUG, logger="adit_tasks")
    spec = lab.demo[0]
    state = transfer_flow("orthanc1", "stranger", [spec.study_uid],
                          nodes_file=lab.nodes_file_in(tmp_path, wrong), return_state=True)
    assert state.is_failed()
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("adit_tasks"))
    assert "stranger: association refused or failed" in text
    for value in _patient_values(spec):
        assert value not in text
