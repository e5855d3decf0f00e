"""What a batch file is made of: its columns, a valid row, a problem, and how a value shows.

Problems end up in Prefect's records (a run's state message, its log, the events Prefect
copies them into) and the CLI's output. A cell that is wrong may hold anything: a name typed
under Modality, a Patient ID pasted into StudyInstanceUID, a file without a header row. So a
problem shows a cell's value only by its length (`length`), whatever its column; the only
values repeated are those that name no patient and that the problem is about: a plain
pseudonym in a pseudonym conflict and the valid From/Until dates of a search whose range is
reversed. A column is named by its known name or its spreadsheet letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from adit_tasks.core.errors import InvalidInput

Purpose = Literal["query", "transfer"]

#: Input columns, in the order problems are reported.
COLUMNS: tuple[str, ...] = (
    "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "From", "Until",
    "Modality", "StudyDescription", "SeriesDescription", "SeriesNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "Pseudonym",
)  # fmt: skip

#: Columns of our result files that are not inputs: accepted and ignored (exactly these).
IGNORED_COLUMNS: frozenset[str] = frozenset({
    "Row", "Status", "Message", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
    "PatientSex", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances", "Instances", "DestinationStudyInstanceUID",
})  # fmt: skip
#: Statuses of batch query result rows that found nothing: a transfer skips those rows.
NOT_TRANSFERABLE = frozenset({"not found", "failure", "error"})

MAX_PROBLEMS_SHOWN = 50

#: A pseudonym that a problem may repeat: letters, digits, space, `-`, `_`, `.`, at most 64.
_PLAIN_PSEUDONYM = re.compile(r"[A-Za-z0-9 ._-]{1,64}")


@dataclass(frozen=True)
class BatchRow:
    """One validated row; text fields are "" when the cell is empty."""

    row: int  # as the spreadsheet shows it: header = 1, first data row = 2
    patient_id: str = ""
    patient_name: str = ""  # DICOM form Last^First
    birth_date: str = ""  # YYYYMMDD
    accession: str = ""
    date_from: str = ""  # YYYYMMDD
    date_until: str = ""  # YYYYMMDD
    modalities: tuple[str, ...] = ()
    study_description: str = ""
    series_description: str = ""
    series_numbers: tuple[str, ...] = ()
    study_uid: str = ""
    series_uid: str = ""
    pseudonym: str = ""
    # The Status of a batch query result row that found nothing ("not found", "failure"):
    # a transfer reports the row as skipped instead of failing the whole file.
    query_status: str = ""


#: BatchRow field of each input column.
FIELD_OF = {
    "PatientID": "patient_id", "PatientName": "patient_name", "PatientBirthDate": "birth_date",
    "AccessionNumber": "accession", "From": "date_from", "Until": "date_until",
    "Modality": "modalities", "StudyDescription": "study_description",
    "SeriesDescription": "series_description", "SeriesNumber": "series_numbers",
    "StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid", "Pseudonym": "pseudonym",
}  # fmt: skip


@dataclass(frozen=True)
class BatchProblem:
    """One problem; row and column are None for problems of the whole file. `column` is a
    known column name, or a spreadsheet letter (`C`) for a column without one."""

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = ", ".join(
            part
            for part in (
                f"row {self.row}" if self.row is not None else "",
                f"column {self.column}" if self.column else "",
            )
            if part
        )
        return f"{where}: {self.message}" if where else self.message


class BatchFileError(InvalidInput):
    """A batch file with problems; `problems` lists all of them."""

    def __init__(self, source: str, problems: list[BatchProblem]) -> None:
        self.source = source
        self.problems = problems
        n = len(problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''} in the batch file"]
        lines += [f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN]]
        if n > MAX_PROBLEMS_SHOWN:
            lines.append(f"  ... and {n - MAX_PROBLEMS_SHOWN} more")
        super().__init__("\n".join(lines))


def column_letter(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (as Excel names columns)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def length(value: str) -> str:
    """A value shown only by its length."""
    return f"<{len(value)} characters>"


def shown(column: str, value: str) -> str:
    """How a cell's value appears in a problem: by its length, except a plain pseudonym
    (the subject of a pseudonym conflict; it names no patient)."""
    if column == "Pseudonym" and _PLAIN_PSEUDONYM.fullmatch(value):
        return value
    return length(value)
