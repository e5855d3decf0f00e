"""Validating a batch file's rows into typed `BatchRow`s, every problem by row and column.

`read_batch_file(source, purpose)` reads a table (`read`), maps its header (`header`) and
checks every cell and row *before* anything runs; it raises `BatchFileError` with all
problems at once, sorted by row and column. The rules are listed in `adit_tasks.core.batch`.
Problems show a bad cell only by its length, in every column (a cell in the wrong column may
hold a name or an ID): see `model`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from pydicom import config as pydicom_config
from pydicom.uid import UID

from adit_tasks.core.batch.header import ROW, frame, map_header
from adit_tasks.core.batch.model import (
    COLUMNS,
    FIELD_OF,
    NOT_TRANSFERABLE,
    BatchFileError,
    BatchProblem,
    BatchRow,
    Purpose,
    length,
    shown,
)
from adit_tasks.core.batch.read import read_table
from adit_tasks.core.dates import ONE_DATE_HELP, date_or_none, dicom_date

DATE_COLUMNS = ("PatientBirthDate", "From", "Until")
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID")
#: Columns where a query may use the DICOM wildcards `*` and `?`.
WILDCARD_COLUMNS = ("PatientName", "StudyDescription", "SeriesDescription")
#: Maximum lengths (DICOM VRs: LO 64, PN 64 per group, SH 16).
MAX_LENGTH = {
    "PatientID": 64, "PatientName": 64, "AccessionNumber": 16, "StudyDescription": 64,
    "SeriesDescription": 64, "Pseudonym": 64,
}  # fmt: skip
QUERY_NEEDS = "PatientID, PatientName + PatientBirthDate, AccessionNumber or StudyInstanceUID"

_MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
_INTEGER = re.compile(r"[+-]?\d{1,10}")
_CONTROL = r"[\x00-\x1f\x7f]"
_PSEUDONYM_FORBIDDEN = r'[/\\:*?"<>|]'


def _parse_date(text: str) -> str | None:
    """YYYYMMDD of an accepted date spelling, None when invalid."""
    day = date_or_none(text)
    return dicom_date(day) if day else None


def _parse_uid(text: str) -> str | None:
    # IGNORE: UID() would otherwise warn (or raise, per pydicom's config) on invalid values.
    return text if UID(text, validation_mode=pydicom_config.IGNORE).is_valid else None


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_modalities(text: str) -> tuple[str, ...] | None:
    codes = tuple(code.upper() for code in _split_list(text))
    return codes if all(_MODALITY.fullmatch(c) for c in codes) else None


def _parse_series_numbers(text: str) -> tuple[str, ...] | None:
    numbers = []
    for part in _split_list(text):
        if not _INTEGER.fullmatch(part) or not -(2**31) <= int(part) < 2**31:
            return None
        numbers.append(str(int(part)))
    return tuple(numbers)


def _dicom_name(text: str) -> str:
    """'Last, First' -> 'Last^First'; 'Last^First' unchanged (blanks around ^ removed)."""
    if "^" not in text and "," in text:
        text = "^".join(part.strip() for part in text.split(","))
    return "^".join(part.strip() for part in text.split("^"))


class _Checker:
    """Collects problems; a cell gets at most one problem."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df
        self.rows = df[ROW].to_numpy()
        self.problems: list[BatchProblem] = []
        self.bad: dict[str, pd.Series] = {c: pd.Series(False, index=df.index) for c in COLUMNS}

    def flag(self, column: str, mask: pd.Series, message: Callable[[str], str]) -> None:
        """Report every cell of `column` where `mask` holds (and no problem is known yet);
        `message` gets the cell as a problem shows it: its length."""
        values = self.df[column]
        self.flag_at(column, mask, lambda i: message(length(values.iat[i])))

    def flag_at(self, column: str, mask: pd.Series, message: Callable[[int], str]) -> None:
        """As `flag`, the message made from the row's position in the frame."""
        mask = mask & ~self.bad[column]
        if not mask.any():
            return
        self.bad[column] = self.bad[column] | mask
        for i in mask.to_numpy().nonzero()[0]:
            self.problems.append(BatchProblem(int(self.rows[i]), column, message(int(i))))

    def parse(
        self, column: str, parser: Callable[[str], object], message: Callable[[str], str]
    ) -> pd.Series:
        """Parse each distinct non-empty value once; flag the ones the parser rejects (None)."""
        values = self.df[column]
        parsed = {v: parser(v) for v in values.unique() if v}
        result = values.map(lambda v: parsed.get(v) if v else "")
        self.flag(column, result.isna(), message)
        return result


def _validate(
    df: pd.DataFrame, purpose: Purpose
) -> tuple[list[BatchProblem], dict[str, pd.Series]]:
    """All cell and row problems, and the normalized columns of the valid cells."""
    check = _Checker(df)
    filled = {c: df[c] != "" for c in COLUMNS}

    # Cell content that no column accepts.
    for column in COLUMNS:
        s = df[column]
        check.flag(
            column,
            s.str.contains(_CONTROL, regex=True),
            lambda v: f"line break or control character in '{v}'",
        )
        allowed = purpose == "query" and column in WILDCARD_COLUMNS
        if not allowed:
            where = (
                f"only in {', '.join(WILDCARD_COLUMNS)} of a query"
                if purpose == "query"
                else "not in a transfer"
            )
            check.flag(
                column,
                s.str.contains(r"[*?]", regex=True),
                lambda v, where=where: f"wildcard (* ?) in '{v}': allowed {where}",
            )
        if column in MAX_LENGTH:
            limit = MAX_LENGTH[column]
            check.flag(
                column,
                s.str.len() > limit,
                lambda v, limit=limit: f"'{v}' is longer than {limit} characters",
            )
        if column not in ("Pseudonym", *DATE_COLUMNS, *UID_COLUMNS):
            check.flag(
                column,
                s.str.contains("\\", regex=False),
                lambda v: f"backslash in '{v}' (DICOM reads it as a value separator)",
            )

    normalized: dict[str, pd.Series] = {}
    for column in DATE_COLUMNS:
        normalized[column] = check.parse(
            column, _parse_date, lambda v: f"invalid date '{v}' ({ONE_DATE_HELP})"
        )
    for column in UID_COLUMNS:
        check.parse(column, _parse_uid, lambda v: (
            f"invalid UID '{v}' (digits and dots, no leading zeros in a component, "
            "at most 64 characters)"
        ))  # fmt: skip
    normalized["Modality"] = check.parse("Modality", _parse_modalities, lambda v: (
        f"invalid modality '{v}' (codes of 1-16 letters, digits or _, comma separated, "
        "e.g. CT,MR)"
    ))  # fmt: skip
    normalized["SeriesNumber"] = check.parse("SeriesNumber", _parse_series_numbers, lambda v: (
        f"invalid series number '{v}' (whole numbers, comma separated, e.g. 1,3)"
    ))  # fmt: skip
    normalized["PatientName"] = check.parse(
        "PatientName",
        lambda v: n if (n := _dicom_name(v)).count("^") <= 4 else None,
        lambda v: f"invalid name '{v}' (use Last^First or 'Last, First')",
    )
    pseudonym = df["Pseudonym"]
    check.flag(
        "Pseudonym",
        pseudonym.str.contains(_PSEUDONYM_FORBIDDEN, regex=True) | pseudonym.isin([".", ".."]),
        lambda v: f"invalid pseudonym '{v}' (no / \\ : * ? \" < > | and not . or ..)",
    )

    # From after Until.
    start, end = normalized["From"], normalized["Until"]
    both = filled["From"] & filled["Until"] & start.notna() & end.notna()
    later = both & (start.fillna("") > end.fillna(""))
    check.flag_at(
        "Until",
        later,
        lambda i: f"Until '{df['Until'].iat[i]}' is before From '{df['From'].iat[i]}'",
    )

    # Required values.
    if purpose == "query":
        has_name, has_birth = filled["PatientName"], filled["PatientBirthDate"]
        other = filled["PatientID"] | filled["AccessionNumber"] | filled["StudyInstanceUID"]
        check.flag(
            "PatientBirthDate",
            ~other & has_name & ~has_birth,
            lambda v: f"PatientName needs PatientBirthDate too (a query needs {QUERY_NEEDS})",
        )
        check.flag(
            "PatientName",
            ~other & ~has_name & has_birth,
            lambda v: f"PatientBirthDate needs PatientName too (a query needs {QUERY_NEEDS})",
        )
        check.flag(
            "PatientID",
            ~other & ~has_name & ~has_birth,
            lambda v: f"missing: a query needs {QUERY_NEEDS}",
        )
    else:
        # Rows a batch query could not answer stay in its result file; a transfer skips them.
        live = ~_unanswered(df)
        check.flag(
            "PatientID", live & ~filled["PatientID"],
            lambda v: "missing: a transfer needs PatientID"
        )
        check.flag(
            "StudyInstanceUID",
            live & ~filled["StudyInstanceUID"] & filled["SeriesInstanceUID"],
            lambda v: "missing: a SeriesInstanceUID needs its StudyInstanceUID",
        )
        check.flag(
            "StudyInstanceUID",
            live & ~filled["StudyInstanceUID"],
            lambda v: "missing: a transfer needs StudyInstanceUID",
        )

    check.problems += _pseudonym_conflicts(df)
    return check.problems, normalized


def _pseudonym_conflicts(df: pd.DataFrame) -> list[BatchProblem]:
    """One pseudonym per PatientID and one PatientID per pseudonym, naming both rows."""
    problems: list[BatchProblem] = []
    used = df.loc[
        (df["Pseudonym"] != "") & (df["PatientID"] != ""), ["PatientID", "Pseudonym", ROW]
    ]
    if used.empty:
        return problems
    for key, other, what in (
        ("PatientID", "Pseudonym", "pseudonym"),
        ("Pseudonym", "PatientID", "PatientID"),
    ):
        counts = used.groupby(key, sort=False)[other].nunique()
        for value in counts.index[counts > 1]:
            group = used[used[key] == value]
            first_value, first_row = group[other].iat[0], int(group[ROW].iat[0])
            for v, row in zip(group[other], group[ROW], strict=True):
                if v != first_value:
                    problems.append(BatchProblem(int(row), "Pseudonym", (
                        f"{key} '{shown(key, value)}' has {what} '{shown(other, v)}' here "
                        f"but '{shown(other, first_value)}' in row {first_row}"
                    )))  # fmt: skip
    return problems


def _unanswered(df: pd.DataFrame) -> pd.Series:
    """Rows of a batch query result that found no study (a Status such as 'not found' and no
    StudyInstanceUID). A failed transfer row keeps its UID and is transferred again."""
    return df["Status"].str.casefold().isin(NOT_TRANSFERABLE) & (df["StudyInstanceUID"] == "")


def _rows(df: pd.DataFrame, normalized: dict[str, pd.Series]) -> list[BatchRow]:
    columns = [normalized[c] if c in normalized else df[c] for c in COLUMNS]
    status = df["Status"].where(_unanswered(df), "")
    columns.append(status)
    keys = ["row", *(FIELD_OF[c] for c in COLUMNS), "query_status"]
    empty_tuple = {"modalities", "series_numbers"}
    rows = []
    for values in zip(df[ROW].tolist(), *(c.tolist() for c in columns), strict=True):
        cells = dict(zip(keys, values, strict=True))
        for key in empty_tuple:
            if cells[key] == "":
                cells[key] = ()
        rows.append(BatchRow(**cells))  # type: ignore[arg-type]
    return rows


def read_batch_file(source: str | Path, purpose: Purpose) -> list[BatchRow]:
    """Read and validate a batch file (path to .csv/.xlsx, or pasted CSV text).

    Raises BatchFileError with every problem found, or InvalidInput when the file cannot be
    read at all (missing, unsupported type, corrupt .xlsx).
    """
    if purpose not in ("query", "transfer"):
        raise ValueError(f"purpose must be 'query' or 'transfer', not {purpose!r}")
    label, table = read_table(source)
    if isinstance(table, list):
        raise BatchFileError(label, table)
    index_of, problems = map_header(table)
    df, more = frame(table, index_of)
    cell_problems, normalized = _validate(df, purpose)
    problems += more + cell_problems
    if problems:
        order = {c: i for i, c in enumerate(COLUMNS)}
        problems.sort(key=lambda p: (p.row or 0, order.get(p.column or "", len(order))))
        raise BatchFileError(label, problems)
    return _rows(df, normalized)
