"""C-ECHO and C-FIND: queries at patient, study, series and image level, typed results.

PACS quirks handled here:
- `dcmqrscp` returns no SeriesDescription at series level and no SOPClassUID at image level.
- Some servers (DCMTK `dcmqrscp`) answer a study-level C-FIND without
  NumberOfStudyRelatedInstances or ModalitiesInStudy. We then count and collect them with a
  series-level query per study (and image level when the series counts are missing too).
- Some servers ignore matching keys they do not index (modality, descriptions, dates). Every
  result is re-checked against the query on our side, so a result list never holds a study the
  user did not ask for.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from pydicom import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from adit_tasks.core.association import Connection
from adit_tasks.core.errors import InvalidInput
from adit_tasks.core.instances import is_uid, raw_value
from adit_tasks.core.status import check_status

logger = logging.getLogger(__name__)


class Level(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


_DATE = re.compile(r"^\d{8}$")


def validate_uid(value: str, what: str = "UID") -> str:
    """The UID itself, or InvalidInput naming what is wrong with it."""
    value = value.strip()
    if not is_uid(value):
        # The value is not repeated: a mistyped Patient ID would land in logs and run states.
        raise InvalidInput(f"invalid {what} ({len(value)} characters; a UID is digits and "
                           "dots, at most 64 characters)")
    return value


def _dicom_range(start: str, end: str) -> str:
    return start if start == end else f"{start}-{end}"


@dataclass(frozen=True)
class Query:
    """What to look for. Empty fields are not matched; text fields take DICOM wildcards (* ?)."""

    level: Level = Level.STUDY
    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    study_date: tuple[str, str] | None = None
    modality: str = ""
    accession: str = ""
    study_uid: str = ""
    series_uid: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: str = ""
    limit: int = 0  # stop after this many results (0: no limit)

    def __post_init__(self) -> None:
        for name in ("study_uid", "series_uid"):
            if getattr(self, name):
                validate_uid(getattr(self, name), name.replace("_", " "))
        if self.birth_date and not _DATE.match(self.birth_date):
            raise InvalidInput("invalid birth date: use YYYYMMDD")


@dataclass(frozen=True)
class Patient:
    PatientID: str
    PatientName: str
    PatientBirthDate: str
    PatientSex: str = ""


@dataclass(frozen=True)
class Study:
    PatientID: str
    PatientName: str
    PatientBirthDate: str
    StudyDate: str
    StudyTime: str
    ModalitiesInStudy: str  # backslash-free: comma separated for CSV friendliness
    StudyDescription: str
    AccessionNumber: str
    NumberOfStudyRelatedInstances: int | None
    StudyInstanceUID: str

    @property
    def modalities(self) -> list[str]:
        return [m for m in self.ModalitiesInStudy.split(",") if m]


@dataclass(frozen=True)
class Series(Study):
    SeriesInstanceUID: str = ""
    SeriesNumber: str = ""
    SeriesDescription: str = ""
    Modality: str = ""
    NumberOfSeriesRelatedInstances: int | None = None


@dataclass(frozen=True)
class Instance:
    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    InstanceNumber: str = ""


def as_row(result: Any) -> dict[str, Any]:
    """A query result as an ordered dict of its columns (for tables and CSV)."""
    return {f.name: getattr(result, f.name) for f in fields(result)}


# --- DIMSE ------------------------------------------------------------------------------------


def echo(conn: Connection) -> None:
    """C-ECHO; raises when the server does not answer with success."""
    with conn.associate([build_context(Verification)]) as assoc:
        check_status(conn.node, "C-ECHO", assoc.send_c_echo())


_RETURN_KEYS: dict[Level, list[str]] = {
    Level.PATIENT: ["PatientID", "PatientName", "PatientBirthDate", "PatientSex"],
    Level.STUDY: [
        "PatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime",
        "ModalitiesInStudy", "StudyDescription", "AccessionNumber",
        "NumberOfStudyRelatedInstances", "StudyInstanceUID",
    ],
    Level.SERIES: [
        "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
        "Modality", "NumberOfSeriesRelatedInstances", "SeriesDate",
    ],
    Level.IMAGE: [
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
        "InstanceNumber",
    ],
}  # fmt: skip


def _identifier(query: Query, level: Level) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    for key in _RETURN_KEYS[level]:
        setattr(ds, key, "")
    # Matching keys. Only keys the level defines are sent: strict servers reject others.
    if level in (Level.PATIENT, Level.STUDY):
        ds.PatientID = query.patient_id
        ds.PatientName = query.patient_name
        ds.PatientBirthDate = query.birth_date
    if level == Level.STUDY:
        if query.study_date:
            ds.StudyDate = _dicom_range(*query.study_date)
        ds.AccessionNumber = query.accession
        ds.StudyDescription = query.study_description
        ds.ModalitiesInStudy = query.modality.replace(",", "\\")  # several: CT\\MR
    if level != Level.PATIENT:
        ds.StudyInstanceUID = query.study_uid
    if level == Level.SERIES:
        # Several values are not matchable at series level: ask for all, filter on our side.
        ds.Modality = "" if "," in query.modality else query.modality
        ds.SeriesDescription = query.series_description
        ds.SeriesNumber = "" if "," in query.series_number else query.series_number
    if level in (Level.SERIES, Level.IMAGE):
        ds.SeriesInstanceUID = query.series_uid
    return ds


def find_datasets(conn: Connection, identifier: Dataset, *, patient_root: bool = False,
                  limit: int = 0) -> Iterator[Dataset]:
    """Raw C-FIND: the identifiers the server returns, cancelled after `limit` results."""
    model = (
        PatientRootQueryRetrieveInformationModelFind
        if patient_root
        else StudyRootQueryRetrieveInformationModelFind
    )
    level = identifier.get("QueryRetrieveLevel", "")
    with conn.associate([build_context(model)]) as assoc:
        count = 0
        msg_id = 1
        responses = assoc.send_c_find(identifier, model, msg_id=msg_id)
        for status, result in responses:
            code = check_status(conn.node, "C-FIND", status)
            if code in (0xFF00, 0xFF01) and result is not None:
                count += 1
                yield result
                if limit and count >= limit:
                    assoc.send_c_cancel(msg_id, query_model=model)
                    logger.info("%s: C-FIND %s cancelled after %d results", conn.node.name,
                                level, count)
                    # Drain what the server still sends until its final response.
                    for status, _ in responses:
                        if status is None or status.get("Status", 0) not in (0xFF00, 0xFF01):
                            break
                    return
        logger.debug("%s: C-FIND %s: %d results", conn.node.name, level, count)


def _text(ds: Dataset, key: str) -> str:
    value = ds.get(key, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return ",".join(str(v) for v in value)
    return str(value).strip()


_UIDS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
_COUNTS = {"NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances"}
_NUMBERS = {"SeriesNumber", "InstanceNumber"}  # IS: read raw, shown as sent


def _answer(ds: Dataset, result: type, skip: type | None = None) -> dict[str, Any]:
    """The fields of a typed result read from a C-FIND answer, each checked by its kind:
    UIDs well-formed or '', counts as numbers or None, the rest as text."""
    skipped = {f.name for f in fields(skip)} if skip else set()
    values: dict[str, Any] = {}
    for f in fields(result):
        if f.name in skipped:
            continue
        if f.name in _UIDS:
            values[f.name] = _uid(ds, f.name)
        elif f.name in _COUNTS:
            values[f.name] = _int(ds, f.name)
        elif f.name in _NUMBERS:
            values[f.name] = raw_value(ds, f.name)
        else:
            values[f.name] = _text(ds, f.name)
    return values


def _uid(ds: Dataset, key: str) -> str:
    """A UID from a peer's answer, '' when missing or malformed (never used as sent)."""
    value = raw_value(ds, key)
    return value if value and is_uid(value) else ""


def _int(ds: Dataset, key: str) -> int | None:
    text = raw_value(ds, key)  # read raw: pydicom's warning about a bad IS prints the value
    try:
        return int(text) if text else None
    except ValueError:
        return None


def _wildcard_match(pattern: str, value: str) -> bool:
    """DICOM wildcard match (* and ?), case-insensitive, as most PACS do for text."""
    if not pattern:
        return True
    return fnmatch.fnmatchcase(value.casefold(), pattern.casefold().replace("[", "[[]"))


def _in_range(value: str, rng: tuple[str, str] | None) -> bool:
    if not rng or not value:
        return True
    start, end = rng
    return (not start or value >= start) and (not end or value <= end)


def find_patients(conn: Connection, query: Query) -> list[Patient]:
    """Patient-level C-FIND (patient root), e.g. to find Patient IDs by name and birth date."""
    results = []
    for ds in find_datasets(conn, _identifier(query, Level.PATIENT), patient_root=True,
                            limit=query.limit):
        p = Patient(**_answer(ds, Patient))
        if query.birth_date and p.PatientBirthDate and p.PatientBirthDate != query.birth_date:
            continue
        results.append(p)
    return results


def find_studies(conn: Connection, query: Query) -> list[Study]:
    """Study-level C-FIND, with counts and modalities completed where the server omits them."""
    patient_root = conn.node.query_root == "patient" and bool(query.patient_id)
    # All answers first: completing one opens another association, and the node's only slot
    # may be the one this C-FIND holds.
    answers = [Study(**_answer(ds, Study)) for ds in find_datasets(
        conn, _identifier(query, Level.STUDY), patient_root=patient_root)]
    studies = []
    for study in answers:
        if not study.StudyInstanceUID:
            logger.warning("%s: a C-FIND result without a valid StudyInstanceUID was left out",
                           conn.node.name)
            continue
        if not study.ModalitiesInStudy or study.NumberOfStudyRelatedInstances is None:
            study = _complete_study(conn, study)
        if _study_matches(query, study):
            studies.append(study)
            if query.limit and len(studies) >= query.limit:
                break
    return studies


def find_at_level(conn: Connection, query: Query) -> list[Study] | list[Series]:
    """Studies, or series when the query's level is SERIES."""
    if query.level == Level.SERIES:
        return find_series(conn, query)
    return find_studies(conn, query)


def _study_matches(query: Query, study: Study) -> bool:
    if query.modality and study.modalities:
        wanted = {m.strip().upper() for m in query.modality.replace("\\", ",").split(",")}
        if not wanted & set(study.modalities):
            return False
    return (
        _wildcard_match(query.study_description, study.StudyDescription)
        and _in_range(study.StudyDate, query.study_date)
        and (not query.accession or _wildcard_match(query.accession, study.AccessionNumber))
        and (not query.patient_id or _wildcard_match(query.patient_id, study.PatientID))
        and (not query.study_uid or study.StudyInstanceUID == query.study_uid)
    )


def _complete_study(conn: Connection, study: Study) -> Study:
    """Fill ModalitiesInStudy and the instance count from a series-level query."""
    series = find_series(conn, Query(level=Level.SERIES, study_uid=study.StudyInstanceUID),
                         parent=study)
    modalities = sorted({s.Modality for s in series if s.Modality})
    counts = [s.NumberOfSeriesRelatedInstances for s in series]
    if any(c is None for c in counts):
        total: int | None = sum(1 for _ in find_instances(conn, study.StudyInstanceUID))
    else:
        total = sum(c or 0 for c in counts)
    return Study(**{
        **as_row(study),
        "ModalitiesInStudy": study.ModalitiesInStudy or ",".join(modalities),
        "NumberOfStudyRelatedInstances": (
            study.NumberOfStudyRelatedInstances
            if study.NumberOfStudyRelatedInstances is not None else total
        ),
    })


def find_series(conn: Connection, query: Query, *, parent: Study | None = None) -> list[Series]:
    """Series-level C-FIND. Needs a StudyInstanceUID, or finds the studies first."""
    if query.study_uid:
        parents = [parent] if parent else find_studies(
            conn, Query(study_uid=query.study_uid, patient_id=query.patient_id))
    else:
        parents = find_studies(conn, Query(**{**_query_fields(query), "level": Level.STUDY,
                                              "series_description": "", "series_number": "",
                                              "series_uid": "", "limit": 0}))
    results: list[Series] = []
    for study in parents:
        sub = Query(level=Level.SERIES, study_uid=study.StudyInstanceUID,
                    series_uid=query.series_uid, modality=query.modality,
                    series_description=query.series_description,
                    series_number=query.series_number)
        for ds in find_datasets(conn, _identifier(sub, Level.SERIES)):
            series = Series(**{**as_row(study), **_answer(ds, Series, skip=Study)})
            if not series.SeriesInstanceUID:
                logger.warning("%s: a C-FIND result without a valid SeriesInstanceUID was "
                               "left out", conn.node.name)
                continue
            if _series_matches(sub, series):
                results.append(series)
                if query.limit and len(results) >= query.limit:
                    return results
    return results


def _series_matches(query: Query, series: Series) -> bool:
    if query.modality:
        wanted = {m.strip().upper() for m in query.modality.replace("\\", ",").split(",")}
        if series.Modality and series.Modality.upper() not in wanted:
            return False
    numbers = {n.strip() for n in query.series_number.split(",") if n.strip()}
    return (
        _wildcard_match(query.series_description, series.SeriesDescription)
        and (not numbers or series.SeriesNumber in numbers)
        and (not query.series_uid or series.SeriesInstanceUID == query.series_uid)
    )


def _query_fields(query: Query) -> dict[str, Any]:
    return {f.name: getattr(query, f.name) for f in fields(query)}


def find_instances(conn: Connection, study_uid: str, series_uid: str = "") -> Iterator[Instance]:
    """Image-level C-FIND (study root) of one study or series."""
    query = Query(level=Level.IMAGE, study_uid=study_uid, series_uid=series_uid)
    for ds in find_datasets(conn, _identifier(query, Level.IMAGE)):
        answer = _answer(ds, Instance)
        instance = Instance(**{**answer, "StudyInstanceUID": answer["StudyInstanceUID"]
                               or study_uid})
        if instance.SOPInstanceUID and instance.StudyInstanceUID == study_uid:
            yield instance
        else:
            logger.warning("%s: an image-level C-FIND result with a missing or malformed "
                           "UID, or of another study, was left out", conn.node.name)


@dataclass
class StudyManifest:
    """What a retrieval should deliver: the instances a server lists for a study or series."""

    study_uid: str
    series_uids: tuple[str, ...] = ()
    instances: dict[str, Instance] = field(default_factory=dict)  # by SOPInstanceUID

    @property
    def sop_classes(self) -> set[str]:
        return {i.SOPClassUID for i in self.instances.values() if i.SOPClassUID}

    def __len__(self) -> int:
        return len(self.instances)


def manifest(conn: Connection, study_uid: str, series_uids: tuple[str, ...] = ()) -> StudyManifest:
    """List every instance of a study (or of the given series) with an image-level C-FIND."""
    result = StudyManifest(study_uid=validate_uid(study_uid, "StudyInstanceUID"),
                           series_uids=tuple(validate_uid(s, "SeriesInstanceUID")
                                             for s in series_uids))
    for series_uid in series_uids or ("",):
        for inst in find_instances(conn, study_uid, series_uid):
            if inst.SOPInstanceUID:
                result.instances[inst.SOPInstanceUID] = inst
    return result
