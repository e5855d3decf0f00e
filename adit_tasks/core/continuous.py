"""Continuous transfer: the plain logic (state, date chunks, filters), no Prefect.

A job works through its history oldest first, a chunk of days per C-FIND (split further when a
query hits the server's result limit), and then keeps up with new studies, re-checking a short
overlap window because studies arrive at a PACS late and incomplete. Its state is a small JSON
document that the flow keeps in a Prefect variable, where every worker sees it.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from adit_tasks.core import find
from adit_tasks.core.association import Connection
from adit_tasks.core.dates import DICOM_DATE as DATE
from adit_tasks.core.errors import InvalidInput


@dataclass
class JobState:
    """What a continuous job has done: the next day of the sweep, and failures to retry."""

    cursor: str  # YYYYMMDD: days before it have been swept (the overlap is swept again)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # study UID -> info
    recheck: str = ""  # YYYYMMDD: where the slow re-check of swept history goes on
    transferred_total: int = 0
    runs: int = 0

    @classmethod
    def load(cls, data: Any, start: dt.date) -> JobState:
        if not isinstance(data, dict) or "cursor" not in data:
            return cls(cursor=start.strftime(DATE))
        return cls(cursor=str(data["cursor"]), failed=dict(data.get("failed") or {}),
                   recheck=str(data.get("recheck") or ""),
                   transferred_total=int(data.get("transferred_total") or 0),
                   runs=int(data.get("runs") or 0))

    def dump(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pattern:
    """A text filter: DICOM wildcards (* ?), or a regular expression written as /.../,
    both case-insensitive. An empty pattern matches everything."""

    text: str = ""

    def __post_init__(self) -> None:
        if self.is_regex:
            try:
                re.compile(self.text[1:-1])
            except re.error as exc:
                raise InvalidInput(f"invalid regular expression {self.text}: {exc}") from None

    @property
    def is_regex(self) -> bool:
        return len(self.text) >= 2 and self.text.startswith("/") and self.text.endswith("/")

    @property
    def dicom_wildcard(self) -> str:
        """What the PACS may match itself ('' for a regex: we filter on our side)."""
        return "" if self.is_regex else self.text

    def matches(self, value: str) -> bool:
        if not self.text:
            return True
        if self.is_regex:
            return re.search(self.text[1:-1], value, re.IGNORECASE) is not None
        return fnmatch.fnmatchcase(value.casefold(), self.text.casefold().replace("[", "[[]"))


@dataclass(frozen=True)
class StudyFilter:
    """Which studies (and series) a continuous job wants."""

    modality: str = ""
    study_description: Pattern = Pattern()
    series_description: Pattern = Pattern()
    institution_name: Pattern = Pattern()
    min_instances: int = 0

    def query(self, start: dt.date, end: dt.date) -> find.Query:
        return find.Query(study_date=(start.strftime(DATE), end.strftime(DATE)),
                          modality=self.modality,
                          study_description=self.study_description.dicom_wildcard)

    def wants(self, study: find.Study) -> bool:
        return (self.study_description.matches(study.StudyDescription)
                and (study.NumberOfStudyRelatedInstances or 0) >= self.min_instances)


def find_chunk(conn: Connection, flt: StudyFilter, start: dt.date, end: dt.date,
               limit: int | None) -> list[find.Study]:
    """Studies of [start, end] that the filter wants. A query that returns `limit` results
    (the server's maximum) may be cut short, so the range is halved until it is not."""
    studies = find.find_studies(conn, flt.query(start, end))
    if limit and len(studies) >= limit and start < end:
        middle = start + (end - start) // 2
        return (find_chunk(conn, flt, start, middle, limit)
                + find_chunk(conn, flt, middle + dt.timedelta(days=1), end, limit))
    return [s for s in studies if flt.wants(s)]


def wanted_series(conn: Connection, flt: StudyFilter, study: find.Study) -> tuple[str, ...] | None:
    """The series to transfer: () for the whole study, None when nothing matches.

    Series filters (description, institution) need a series-level query; institution name is
    asked for at series level because most PACS do not index it for studies. A server that
    does not return an attribute the filter needs matches nothing: only what is verified to
    match is transferred.
    """
    if not (flt.series_description.text or flt.institution_name.text):
        return ()
    series = find.find_series(conn, find.Query(
        level=find.Level.SERIES, study_uid=study.StudyInstanceUID,
        series_description=flt.series_description.dicom_wildcard), parent=study)
    institutions = _series_institutions(conn, study) if flt.institution_name.text else {}
    chosen = tuple(s.SeriesInstanceUID for s in series
                   if flt.series_description.matches(s.SeriesDescription)
                   and (not flt.institution_name.text
                        or flt.institution_name.matches(institutions.get(s.SeriesInstanceUID,
                                                                         ""))))
    if not chosen:
        return None
    return () if len(chosen) == len(series) else chosen


def _series_institutions(conn: Connection, study: find.Study) -> dict[str, str]:
    from pydicom import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study.StudyInstanceUID
    ds.SeriesInstanceUID = ""
    ds.InstitutionName = ""
    return {str(r.get("SeriesInstanceUID", "")): str(r.get("InstitutionName", "") or "")
            for r in find.find_datasets(conn, ds)}
