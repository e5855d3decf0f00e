"""Echo and C-FIND at every level against Orthanc and dcmqrscp."""

from __future__ import annotations

import threading

import pytest

from adit_tasks.core import find
from adit_tasks.core.association import Connection
from adit_tasks.core.errors import InvalidInput
from adit_tasks.core.find import Level, Query
from adit_tasks.core.options import StudySearch

SERVERS = ["orthanc1", "dcmqrscp"]


@pytest.mark.parametrize("server", SERVERS)
def test_echo_answers(lab, server) -> None:
    find.echo(lab.connection(server))


@pytest.mark.parametrize("server", SERVERS)
def test_study_query_by_patient_id_returns_counts_and_modalities(lab, server) -> None:
    conn = lab.connection(server)
    ct = lab.ct
    studies = find.find_studies(conn, Query(patient_id=ct.patient_id))
    assert [s.StudyInstanceUID for s in studies] == [ct.study_uid]
    study = studies[0]
    # dcmqrscp omits these at study level: they must be completed from series/image level.
    assert study.NumberOfStudyRelatedInstances == 150
    assert study.ModalitiesInStudy == "CT"
    assert study.AccessionNumber == ct.accession
    assert study.PatientName == ct.patient_name


@pytest.mark.parametrize("server", SERVERS)
def test_wildcard_name_and_date_range(lab, server) -> None:
    conn = lab.connection(server)
    spec = lab.demo[0]
    family = spec.patient_name.split("^")[0]
    studies = find.find_studies(conn, Query(patient_name=f"{family[:3]}*"))
    assert spec.study_uid in {s.StudyInstanceUID for s in studies}
    day = spec.study_date
    in_range = find.find_studies(conn, Query(study_date=(day, day)))
    assert spec.study_uid in {s.StudyInstanceUID for s in in_range}
    assert all(s.StudyDate == day for s in in_range)
    before = find.find_studies(conn, Query(study_date=("", "19991231")))
    assert before == []


@pytest.mark.parametrize("server", SERVERS)
def test_modality_filter_is_rechecked(lab, server) -> None:
    conn = lab.connection(server)
    all_studies = find.find_studies(conn, Query())
    mr = find.find_studies(conn, Query(modality="MR"))
    expected = {s.StudyInstanceUID for s in all_studies if "MR" in s.modalities}
    assert {s.StudyInstanceUID for s in mr} == expected
    assert expected, "the demo data should contain MR studies"


@pytest.mark.parametrize("server", SERVERS)
def test_series_and_image_level(lab, server) -> None:
    conn = lab.connection(server)
    spec = next(s for s in lab.demo if len(s.series) > 1) if any(
        len(s.series) > 1 for s in lab.demo) else lab.demo[0]
    series = find.find_series(conn, Query(level=Level.SERIES, study_uid=spec.study_uid))
    assert sorted(s.SeriesInstanceUID for s in series) == sorted(
        spec.series_uid(s) for s in spec.series)
    for s in series:
        want = next(x for x in spec.series if spec.series_uid(x) == s.SeriesInstanceUID)
        # dcmqrscp does not index SeriesDescription and returns it empty.
        assert s.SeriesDescription == (want.description if server == "orthanc1" else "")
        assert s.PatientID == spec.patient_id
    manifest = find.manifest(conn, spec.study_uid)
    assert len(manifest) == spec.instance_count
    one = spec.series[0]
    only = find.manifest(conn, spec.study_uid, (spec.series_uid(one),))
    assert len(only) == one.instances


@pytest.mark.parametrize("server", SERVERS)
def test_patient_level_finds_patient_ids_by_name_and_birth_date(lab, server) -> None:
    conn = lab.connection(server)
    spec = lab.demo[1]
    patients = find.find_patients(conn, Query(level=Level.PATIENT,
                                              patient_name=spec.patient_name,
                                              birth_date=spec.birth_date))
    assert [p.PatientID for p in patients] == [spec.patient_id]


def test_result_limit_stops_early(lab) -> None:
    conn = lab.connection("orthanc1")
    assert len(find.find_studies(conn, Query())) > 2
    assert len(find.find_studies(conn, Query(limit=2))) == 2


def test_patient_root_study_query(lab) -> None:
    settings = lab.settings()
    node = settings.server("orthanc1").model_copy(update={"query_root": "patient"})
    from adit_tasks.core.association import Connection

    conn = Connection(node, "ADIT")
    studies = find.find_studies(conn, Query(patient_id=lab.ct.patient_id))
    assert [s.StudyInstanceUID for s in studies] == [lab.ct.study_uid]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uid_is_rejected_at_the_edge_before_any_network(prefect_server,
                                                                tmp_path) -> None:
    """The flow checks UIDs where they enter; the node is never asked (it does not exist:
    asking it would be an AssociationError, not InvalidInput)."""
    from flows.transfer import transfer_flow

    nowhere = tmp_path / "nodes.yaml"
    nowhere.write_text("nodes:\n  - {name: pacs, ae_title: X, host: 127.0.0.1, port: 9}\n"
                       "  - {name: out, path: out}\n")
    with pytest.raises(InvalidInput, match="StudyInstanceUID"):
        transfer_flow("pacs", "out", ["1.2.3.abc"], nodes_file=str(nowhere))
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        StudySearch(study_uid="1.2.3.abc")


def test_completing_counts_never_needs_a_second_slot(lab) -> None:
    """dcmqrscp leaves out the study-level counts: completing them (series level) must not
    open a second association while the study-level C-FIND still holds the node's only slot
    (it waited for itself for ever)."""
    settings = lab.settings()
    node = settings.server("dcmqrscp").model_copy(update={"max_associations": 1})
    conn = Connection(node, settings.ae_title)
    found: list = []
    worker = threading.Thread(target=lambda: found.extend(
        find.find_studies(conn, Query(patient_id=lab.ct.patient_id))), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "find_studies deadlocked on the node's only slot"
    assert [s.NumberOfStudyRelatedInstances for s in found] == [150]
