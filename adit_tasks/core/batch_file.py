"""Batch files: the spreadsheets of patients and studies that research teams get from clinicians.

A batch file is a `.csv` or `.xlsx` table with one header row and one row per query or transfer.
`read_batch_file` reads and validates it completely *before* anything runs and reports every
problem at once (`BatchFileError.problems`), each naming the row as the spreadsheet shows it
(header = row 1, first data row = row 2) and the column. `write_results` writes result tables
(for example a batch query's output, which is a valid transfer input).

Format
------
- CSV: delimiter `,` or `;` (whichever occurs more often in the header line, so German Excel
  exports work), UTF-8 with or without BOM, Latin-1 when the file is not valid UTF-8. Quoted
  cells may hold the delimiter (`"CT,MR"`). Tab-separated files are rejected with a clear message.
  A `str` containing a line break is pasted CSV text, any other `str` (or `Path`) a file name.
- Excel: `.xlsx`/`.xlsm`, first worksheet; the header is the first non-empty row.
- Every cell is text. Nothing is converted to numbers, so leading zeros of PatientID and
  AccessionNumber stay. Excel cells that *are* numbers (not text) are written without a
  trailing `.0` (`12345.0` -> `"12345"`), zero-padded when the cell's number format is all zeros
  (`00000`), and otherwise as Python prints them; a text cell `"12345.0"` stays as it is.
  Leading zeros that Excel already dropped from a General-formatted number cannot be recovered.
  Excel date cells become `YYYY-MM-DD`. Whitespace around cells is stripped, empty rows skipped.
- Headers are matched ignoring case, spaces and underscores (`patient id` = `PatientID`).

Columns (all optional; which are required depends on the purpose):

=================  =====================================================================
PatientID          exact ID (no wildcards)
PatientName        `Last^First` or `Last, First`; wildcards `*` `?` allowed in queries
PatientBirthDate   date
AccessionNumber    at most 16 characters
From, Until        study date range (inclusive); From must not be after Until
Modality           comma separated codes, e.g. `CT,MR` (upper-cased)
StudyDescription   wildcards allowed in queries
SeriesDescription  wildcards allowed in queries
SeriesNumber       comma separated whole numbers, e.g. `1,3`
StudyInstanceUID   digits and dots, no leading zeros in a component, at most 64 characters
SeriesInstanceUID  as StudyInstanceUID; a transfer row with it needs StudyInstanceUID
Pseudonym          at most 64 characters, no `/ \\ : * ? " < > |`, no control characters;
                   one pseudonym per PatientID and one PatientID per pseudonym
=================  =====================================================================

Dates: `YYYY-MM-DD`, `YYYYMMDD` or `DD.MM.YYYY` (real calendar dates); stored as `YYYYMMDD`.

Every cell: no line breaks or control characters; no backslash in the DICOM text columns (DICOM
reads it as a value separator); PatientID, names and descriptions at most 64 characters.

Required per row -- query: PatientID, or PatientName + PatientBirthDate, or AccessionNumber, or
StudyInstanceUID. Transfer: PatientID and StudyInstanceUID.

The columns a batch query writes that are not inputs (`IGNORED_COLUMNS`: Row, Status, Message,
StudyDate, StudyTime, ...) are accepted and ignored, so a query result is a transfer input. Any
other column is an error (with the closest known name as a suggestion).

Results (`write_results`): `.csv` in UTF-8 with BOM and `,` (Excel shows umlauts; Excel still
drops leading zeros when it *opens* a CSV, so prefer `.xlsx` for humans), or `.xlsx` with every
cell stored as text (format `@`), so IDs keep their zeros and `=...` is never a formula.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Literal

import pandas as pd
from pydicom import config as pydicom_config
from pydicom.uid import UID

from adit_tasks.core.dates import DATE_HELP, date_or_none, dicom_date
from adit_tasks.core.errors import InvalidInput

Purpose = Literal["query", "transfer"]

#: Input columns, in the order problems are reported.
COLUMNS: tuple[str, ...] = (
    "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "From", "Until",
    "Modality", "StudyDescription", "SeriesDescription", "SeriesNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "Pseudonym",
)  # fmt: skip

#: Columns of our result files that are not inputs: accepted and ignored (exactly these).
NOT_TRANSFERABLE = frozenset({"not found", "failure", "error"})
IGNORED_COLUMNS: frozenset[str] = frozenset({
    "Row", "Status", "Message", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
    "PatientSex", "ModalitiesInStudy", "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances", "Instances", "DestinationStudyInstanceUID",
})  # fmt: skip

DATE_COLUMNS = ("PatientBirthDate", "From", "Until")
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID")
#: Columns where a query may use the DICOM wildcards `*` and `?`.
WILDCARD_COLUMNS = ("PatientName", "StudyDescription", "SeriesDescription")
#: Maximum lengths (DICOM VRs: LO 64, PN 64 per group, SH 16).
MAX_LENGTH = {
    "PatientID": 64, "PatientName": 64, "AccessionNumber": 16, "StudyDescription": 64,
    "SeriesDescription": 64, "Pseudonym": 64,
}  # fmt: skip
MAX_PROBLEMS_SHOWN = 50

QUERY_NEEDS = "PatientID, PatientName + PatientBirthDate, AccessionNumber or StudyInstanceUID"
CSV_SUFFIXES = (".csv", ".txt")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")

_FIELD_OF = {
    "PatientID": "patient_id", "PatientName": "patient_name", "PatientBirthDate": "birth_date",
    "AccessionNumber": "accession", "From": "date_from", "Until": "date_until",
    "Modality": "modalities", "StudyDescription": "study_description",
    "SeriesDescription": "series_description", "SeriesNumber": "series_numbers",
    "StudyInstanceUID": "study_uid", "SeriesInstanceUID": "series_uid", "Pseudonym": "pseudonym",
}  # fmt: skip
_ROW = "_row"  # the DataFrame column holding the spreadsheet row number


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


@dataclass(frozen=True)
class BatchProblem:
    """One problem; row and column are None for problems of the whole file."""

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


# --- reading ----------------------------------------------------------------------------------


@dataclass
class _Table:
    """Raw cells: the header and the data records, each with its spreadsheet row number."""

    header_row: int
    header: list[str]
    records: list[tuple[int, list[str]]]


def _normalize_header(name: str) -> str:
    return re.sub(r"[\s_]+", "", name.replace("\ufeff", "")).lower()


_CANONICAL = {_normalize_header(c): c for c in (*COLUMNS, *IGNORED_COLUMNS)}


def _column_letter(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (as Excel names columns)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # never fails: every byte is a character


def _sniff_delimiter(header_line: str) -> str:
    """The most frequent of `,`, `;` and tab in the (unquoted) header line; `,` on a tie.

    Tabs are what cells copied out of Excel and pasted into the Prefect UI's text field use.
    """
    unquoted = re.sub(r'"[^"]*"', "", header_line)
    counts = {d: unquoted.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > counts[","] else ","


def _parse_csv(text: str) -> _Table | list[BatchProblem]:
    text = text.removeprefix("\ufeff")
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return [BatchProblem(None, None, "the file is empty")]
    delimiter = _sniff_delimiter(lines[first])
    # csv copes with quoted line breaks; the record counter is the spreadsheet row number.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    try:
        for number, cells in enumerate(reader, start=1):
            rows.append((number, [c.strip() for c in cells]))
    except csv.Error as exc:
        return [BatchProblem(len(rows) + 1, None, f"unreadable CSV: {exc}")]
    return _split_header(rows, delimiter)


def _split_header(
    rows: list[tuple[int, list[str]]], delimiter: str | None
) -> _Table | list[BatchProblem]:
    """The first non-empty row is the header; checks the table is not empty or one glued column."""
    rows = [(n, cells) for n, cells in rows if any(cells)]
    if not rows:
        return [BatchProblem(None, None, "the file is empty")]
    (header_row, header), records = rows[0], rows[1:]
    while header and not header[-1]:
        header.pop()
    if len(header) == 1:
        for sep, name in (("\t", "tabs"), (";", "';'"), (",", "','")):
            if sep in header[0]:
                expected = (
                    "',' or ';' between the columns"
                    if delimiter
                    else "one column per cell (in Excel: Data > Text to Columns)"
                )
                return [BatchProblem(None, None, (
                    f"wrong delimiter: the header '{_short(header[0], 60)}' is one column "
                    f"separated by {name}; expected {expected}"
                ))]  # fmt: skip
    if not records:
        return [BatchProblem(None, None, "the file has a header but no data rows")]
    return _Table(header_row, header, records)


def _excel_text(value: object, number_format: str) -> str:
    """An Excel cell as text (see the module docstring for the rules)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, datetime):
        if value.time() == time(0):
            return value.date().isoformat()
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, int | float):
        if isinstance(value, float) and not value.is_integer():
            return repr(value)
        text = str(int(value))
        if re.fullmatch(r"0+", number_format or "") and value >= 0:
            text = text.zfill(len(number_format))
        return text
    return str(value).strip()


def _read_excel(path: Path) -> _Table | list[BatchProblem]:
    """The first worksheet via openpyxl (what pandas.read_excel uses, minus the type guessing)."""
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise InvalidInput(f"{path}: not a readable Excel .xlsx file ({exc})") from exc
    try:
        ws = wb.worksheets[0]
        ws.reset_dimensions()  # some writers store wrong dimensions; read what is there
        rows: list[tuple[int, list[str]]] = []
        for number, cells in enumerate(ws.iter_rows(min_row=1, min_col=1), start=1):
            rows.append((number, [
                _excel_text(c.value, getattr(c, "number_format", "") or "") for c in cells
            ]))  # fmt: skip
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, IndexError, OSError) as exc:
        raise InvalidInput(f"{path}: not a readable Excel .xlsx file ({exc})") from exc
    finally:
        wb.close()
    return _split_header(rows, None)


def _read_table(source: str | Path) -> tuple[str, _Table | list[BatchProblem]]:
    """(label for messages, table or file-level problems); InvalidInput for unreadable files."""
    if isinstance(source, str) and ("\n" in source or "\r" in source):
        return "pasted text", _parse_csv(source)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".xls":
        raise InvalidInput(f"{path}: old Excel .xls files are not supported; save as .xlsx or .csv")
    if suffix not in CSV_SUFFIXES + EXCEL_SUFFIXES:
        raise InvalidInput(f"{path}: unsupported batch file type (use .csv or .xlsx)")
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    if suffix in EXCEL_SUFFIXES:
        return str(path), _read_excel(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    return str(path), _parse_csv(_decode(data))


def _map_header(table: _Table) -> tuple[dict[int, str], list[BatchProblem]]:
    """Column index -> known column name (ignored columns left out), and header problems."""
    problems: list[BatchProblem] = []
    index_of: dict[int, str] = {}
    seen: dict[str, str] = {}
    has_value = [False] * len(table.header)
    for _, cells in table.records:
        for i, cell in enumerate(cells[: len(table.header)]):
            if cell:
                has_value[i] = True
    for i, raw in enumerate(table.header):
        if not raw:
            if has_value[i]:
                problems.append(BatchProblem(
                    table.header_row, _column_letter(i), "values under an empty header"
                ))  # fmt: skip
            continue
        name = _CANONICAL.get(_normalize_header(raw))
        if name is None:
            close = difflib.get_close_matches(_normalize_header(raw), list(_CANONICAL), n=1)
            hint = (
                f"did you mean {_CANONICAL[close[0]]}?"
                if close
                else f"known columns: {', '.join(COLUMNS)}"
            )
            problems.append(BatchProblem(
                table.header_row, raw, f"unknown column ({hint})"
            ))  # fmt: skip
            continue
        if name in seen:
            problems.append(BatchProblem(
                table.header_row, raw, f"duplicate column: '{seen[name]}' is also {name}"
            ))  # fmt: skip
            continue
        seen[name] = raw
        if name in COLUMNS or name == "Status":
            index_of[i] = name
    return index_of, problems


def _frame(table: _Table, index_of: dict[int, str]) -> tuple[pd.DataFrame, list[BatchProblem]]:
    """A DataFrame of the known columns (str) plus the row number; cells beyond the header."""
    width = len(table.header)
    problems: list[BatchProblem] = []
    data: dict[str, list[str]] = {name: [] for name in index_of.values()}
    numbers: list[int] = []
    for number, cells in table.records:
        if len(cells) > width:
            for j in range(width, len(cells)):
                if cells[j]:
                    problems.append(BatchProblem(number, _column_letter(j), (
                        f"value '{_short(cells[j])}' outside the header's {width} columns "
                        "(a delimiter inside an unquoted cell?)"
                    )))  # fmt: skip
        numbers.append(number)
        for i, name in index_of.items():
            data[name].append(cells[i] if i < len(cells) else "")
    df = pd.DataFrame({name: pd.Series(values, dtype=str) for name, values in data.items()})
    for name in (*COLUMNS, "Status"):  # absent columns are empty
        if name not in df:
            df[name] = pd.Series([""] * len(numbers), dtype=str)
    df[_ROW] = numbers
    return df, problems


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


# --- validation -------------------------------------------------------------------------------

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
        self.rows = df[_ROW].to_numpy()
        self.problems: list[BatchProblem] = []
        self.bad: dict[str, pd.Series] = {c: pd.Series(False, index=df.index) for c in COLUMNS}

    def flag(self, column: str, mask: pd.Series, message: Callable[[str], str]) -> None:
        """Report every cell of `column` where `mask` holds (and no problem is known yet)."""
        values = self.df[column]
        self.flag_at(column, mask, lambda i: message(_shown(column, values.iat[i])))

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
            lambda v: f"line break or control character in {_short(v)!r}",
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
                lambda v, where=where: f"wildcard (* ?) in '{_short(v)}': allowed {where}",
            )
        if column in MAX_LENGTH:
            limit = MAX_LENGTH[column]
            check.flag(
                column,
                s.str.len() > limit,
                lambda v, limit=limit: f"'{_short(v)}' is longer than {limit} characters",
            )
        if column not in ("Pseudonym", *DATE_COLUMNS, *UID_COLUMNS):
            check.flag(
                column,
                s.str.contains("\\", regex=False),
                lambda v: f"backslash in '{_short(v)}' (DICOM reads it as a value separator)",
            )

    normalized: dict[str, pd.Series] = {}
    for column in DATE_COLUMNS:
        normalized[column] = check.parse(
            column, _parse_date, lambda v: f"invalid date '{_short(v)}' ({DATE_HELP})"
        )
    for column in UID_COLUMNS:
        check.parse(column, _parse_uid, lambda v: (
            f"invalid UID '{_short(v, 70)}' (digits and dots, no leading zeros in a component, "
            "at most 64 characters)"
        ))  # fmt: skip
    normalized["Modality"] = check.parse("Modality", _parse_modalities, lambda v: (
        f"invalid modality '{_short(v)}' (codes of 1-16 letters, digits or _, comma separated, "
        "e.g. CT,MR)"
    ))  # fmt: skip
    normalized["SeriesNumber"] = check.parse("SeriesNumber", _parse_series_numbers, lambda v: (
        f"invalid series number '{_short(v)}' (whole numbers, comma separated, e.g. 1,3)"
    ))  # fmt: skip
    normalized["PatientName"] = check.parse(
        "PatientName",
        lambda v: n if (n := _dicom_name(v)).count("^") <= 4 else None,
        lambda v: f"invalid name '{_short(v)}' (use Last^First or 'Last, First')",
    )
    pseudonym = df["Pseudonym"]
    check.flag(
        "Pseudonym",
        pseudonym.str.contains(_PSEUDONYM_FORBIDDEN, regex=True) | pseudonym.isin([".", ".."]),
        lambda v: f"invalid pseudonym '{_short(v)}' (no / \\ : * ? \" < > | and not . or ..)",
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
        (df["Pseudonym"] != "") & (df["PatientID"] != ""), ["PatientID", "Pseudonym", _ROW]
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
            first_value, first_row = group[other].iat[0], int(group[_ROW].iat[0])
            for v, row in zip(group[other], group[_ROW], strict=True):
                if v != first_value:
                    problems.append(BatchProblem(int(row), "Pseudonym", (
                        f"{key} '{_shown(key, value)}' has {what} '{_shown(other, v)}' here "
                        f"but '{_shown(other, first_value)}' in row {first_row}"
                    )))  # fmt: skip
    return problems


# Problems end up in logs (a deployment run's error): their values stay out of the message.
_IDENTIFYING = frozenset({"PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"})


def _shown(column: str, value: str) -> str:
    """How a cell's value appears in a problem: identifying values only by their length."""
    if column in _IDENTIFYING:
        return f"<{len(value)} characters>"
    return _short(value)


def _unanswered(df: pd.DataFrame) -> pd.Series:
    """Rows of a batch query result that found no study (a Status such as 'not found' and no
    StudyInstanceUID). A failed transfer row keeps its UID and is transferred again."""
    return df["Status"].str.casefold().isin(NOT_TRANSFERABLE) & (df["StudyInstanceUID"] == "")


def _rows(df: pd.DataFrame, normalized: dict[str, pd.Series]) -> list[BatchRow]:
    columns = [normalized[c] if c in normalized else df[c] for c in COLUMNS]
    status = df["Status"].where(_unanswered(df), "")
    columns.append(status)
    keys = ["row", *(_FIELD_OF[c] for c in COLUMNS), "query_status"]
    empty_tuple = {"modalities", "series_numbers"}
    rows = []
    for values in zip(df[_ROW].tolist(), *(c.tolist() for c in columns), strict=True):
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
    label, table = _read_table(source)
    if isinstance(table, list):
        raise BatchFileError(label, table)
    index_of, problems = _map_header(table)
    df, more = _frame(table, index_of)
    cell_problems, normalized = _validate(df, purpose)
    problems += more + cell_problems
    if problems:
        order = {c: i for i, c in enumerate(COLUMNS)}
        problems.sort(key=lambda p: (p.row or 0, order.get(p.column or "", len(order))))
        raise BatchFileError(label, problems)
    return _rows(df, normalized)


# --- writing ----------------------------------------------------------------------------------


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value  # also StrEnum members
    if isinstance(value, tuple | list):
        return ",".join(_as_text(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    return str(value)


def write_results(rows: list[dict[str, object]], path: Path) -> None:
    """Write rows as .csv (UTF-8 with BOM, ',') or .xlsx (text cells), replacing `path` atomically.

    Columns follow the first row's keys (keys only later rows have are appended); every value
    is written as text, tuples and lists comma separated, None as an empty cell.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".xlsx"):
        raise InvalidInput(f"{path}: results can be written as .csv or .xlsx only")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    table = [[_as_text(row.get(c)) for c in columns] for row in rows]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if suffix == ".csv":
            with tmp.open("w", encoding="utf-8-sig", newline="") as f:
                if columns:
                    writer = csv.writer(f)
                    writer.writerow(columns)
                    writer.writerows(table)
        else:
            _write_xlsx(columns, table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_xlsx(columns: list[str], table: list[list[str]], path: Path) -> None:
    import openpyxl
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    from openpyxl.styles import Font

    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet("Results")
    ws.freeze_panes = "A2"
    bold = Font(bold=True)

    def cell(value: str, font: Font | None = None) -> WriteOnlyCell:
        c = WriteOnlyCell(ws)
        # Set type after value: openpyxl would read "=..." as a formula, digits stay text.
        c.value = ILLEGAL_CHARACTERS_RE.sub("", value)
        c.data_type = "s"
        c.number_format = "@"
        if font is not None:
            c.font = font
        return c

    if columns:
        ws.append([cell(c, bold) for c in columns])
    for values in table:
        ws.append([cell(v) for v in values])
    wb.save(path)


__all__ = [
    "COLUMNS",
    "IGNORED_COLUMNS",
    "BatchFileError",
    "BatchProblem",
    "BatchRow",
    "read_batch_file",
    "write_results",
]
