"""Answering one row of a batch query: find the patient, the studies, optionally the series.

A row is looked up by the most specific key it has: StudyInstanceUID, then AccessionNumber,
then PatientID, then PatientName + PatientBirthDate (the "find Patient IDs" case: several
matching patients are a warning, never silently merged). Every input row gets at least one
result row, found or not, so the output is a complete answer and a valid transfer input.
`result_row` also makes the rows of input rows that got no answer (failed, postponed).
Messages name no patient data: they reach the run's table artifact and logs.
"""

from __future__ import annotations

from typing import Any

from adit_tasks.core import find
from adit_tasks.core.association import Connection
from adit_tasks.core.batch import BatchRow
from adit_tasks.core.errors import AditError

STUDY_COLUMNS = ["PatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
                 "ModalitiesInStudy", "StudyDescription", "AccessionNumber",
                 "NumberOfStudyRelatedInstances", "StudyInstanceUID"]
SERIES_COLUMNS = ["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
                  "NumberOfSeriesRelatedInstances"]


def query_row(conn: Connection, row: BatchRow, level: str = "study") -> list[dict[str, Any]]:
    """Result rows for one input row; errors become a 'failure' row naming the problem."""
    try:
        return _query_row(conn, row, level)
    except AditError as exc:
        return [result_row(row, level, "failure", str(exc))]


def _query_row(conn: Connection, row: BatchRow, level: str) -> list[dict[str, Any]]:
    series_level = level == "series" or bool(row.series_description or row.series_numbers)
    base = dict(
        study_date=(row.date_from, row.date_until) if row.date_from or row.date_until else None,
        modality=",".join(row.modalities), study_description=row.study_description,
    )
    message = ""
    if row.study_uid:
        queries = [find.Query(study_uid=row.study_uid, **base)]
    elif row.accession:
        queries = [find.Query(accession=row.accession, patient_id=row.patient_id, **base)]
    elif row.patient_id:
        queries = [find.Query(patient_id=row.patient_id, **base)]
    else:
        patients = find.find_patients(conn, find.Query(level=find.Level.PATIENT,
                                                       patient_name=row.patient_name,
                                                       birth_date=row.birth_date))
        ids = sorted({p.PatientID for p in patients if p.PatientID})
        if not ids:
            return [result_row(row, level, "not found",
                            "no patient with this name and birth date")]
        if len(ids) > 1:
            # Each result row names its PatientID; the message (shown in the run's table
            # artifact and logs) does not.
            message = f"{len(ids)} patients match name and birth date"
        queries = [find.Query(patient_id=pid, **base) for pid in ids]

    studies = [s for q in queries for s in find.find_studies(conn, q)]
    status = "warning" if message else "found"
    if not studies:
        return [result_row(row, level, "not found", message or "no matching study")]
    if not series_level:
        return [result_row(row, level, status, message, study=s) for s in studies]
    results = []
    for study in studies:
        series = find.find_series(conn, find.Query(
            level=find.Level.SERIES, study_uid=study.StudyInstanceUID,
            modality=",".join(row.modalities), series_description=row.series_description,
            series_number=",".join(row.series_numbers)), parent=study)
        results += [result_row(row, level, status, message, study=s) for s in series]
    if not results:
        return [result_row(row, level, "not found", message or "no matching series")]
    return results


def result_row(row: BatchRow, level: str, status: str, message: str,
            study: find.Study | None = None) -> dict[str, Any]:
    """One output row: Row, Status, Message, Pseudonym, then the study (and series) columns.

    Without a study the input's own values are echoed, so the row stays recognisable."""
    columns = STUDY_COLUMNS + (SERIES_COLUMNS if level == "series" else [])
    out: dict[str, Any] = {"Row": row.row, "Status": status, "Message": message,
                           "Pseudonym": row.pseudonym}
    if study is not None:
        values = find.as_row(study)
        out |= {c: values.get(c, "") for c in columns}
        return out
    echo = {"PatientID": row.patient_id, "PatientName": row.patient_name,
            "PatientBirthDate": row.birth_date, "AccessionNumber": row.accession,
            "StudyInstanceUID": row.study_uid}
    out |= {c: echo.get(c, "") for c in columns}
    return out
