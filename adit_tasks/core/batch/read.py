"""Reading a batch file's cells: CSV (file or pasted text) and Excel, every cell as text.

`read_table(source)` returns the raw table (header row, header cells, records, each with its
spreadsheet row number) or the problems of the whole file; it raises InvalidInput when the
file cannot be read at all. What the cells mean is checked elsewhere (`header`, `rows`).

- CSV: delimiter `,`, `;` or tab, whichever occurs most often in the unquoted header line
  (`,` on a tie), so German Excel exports and cells pasted from Excel work. UTF-8 with or
  without BOM; Latin-1 when the file is not valid UTF-8. Quoted cells may hold the delimiter
  and line breaks. The apostrophe our CSV writer puts before cells that a spreadsheet would
  run as formulas is removed (`adit_tasks.core.tables.csv_value`), so result files read back
  with the values that were written.
- Excel: `.xlsx`/`.xlsm`, first worksheet. Number cells are written without a trailing `.0`
  (`12345.0` -> `"12345"`), zero-padded when the cell's number format is all zeros (`00000`),
  and otherwise as Python prints them; a text cell `"12345.0"` stays as it is. Date cells
  become `YYYY-MM-DD`.
- Whitespace around cells is stripped; the header is the first non-empty row; empty rows are
  skipped (the row numbers of the others stay those the spreadsheet shows).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path

from adit_tasks.core.batch.model import BatchProblem
from adit_tasks.core.errors import InvalidInput
from adit_tasks.core.tables import csv_value

CSV_SUFFIXES = (".csv", ".txt")
EXCEL_SUFFIXES = (".xlsx", ".xlsm")

Records = list[tuple[int, list[str]]]  # (spreadsheet row number, cells)


@dataclass
class RawTable:
    """Raw cells: the header and the data records, each with its spreadsheet row number."""

    header_row: int
    header: list[str]
    records: Records


def read_table(source: str | Path) -> tuple[str, RawTable | list[BatchProblem]]:
    """(label for messages, table or file-level problems); InvalidInput for unreadable files.

    A `str` containing a line break is pasted CSV text, any other `str` (or `Path`) a file.
    """
    if isinstance(source, str) and ("\n" in source or "\r" in source):
        return "pasted text", parse_csv(source)
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
    return str(path), parse_csv(_decode(data))


def parse_csv(text: str) -> RawTable | list[BatchProblem]:
    text = text.removeprefix("\ufeff")
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return [BatchProblem(None, None, "the file is empty")]
    delimiter = _sniff_delimiter(lines[first])
    # csv copes with quoted line breaks; the record counter is the spreadsheet row number.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: Records = []
    try:
        for number, cells in enumerate(reader, start=1):
            rows.append((number, [csv_value(c.strip()) for c in cells]))
    except csv.Error as exc:
        return [BatchProblem(len(rows) + 1, None, f"unreadable CSV: {exc}")]
    return _split_header(rows, delimiter)


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


def _split_header(rows: Records, delimiter: str | None) -> RawTable | list[BatchProblem]:
    """The first non-empty row is the header; checks the table is not empty or one glued column.

    `delimiter` is None for Excel (where the cells are already split)."""
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
                # The header's text stays out: a file without a header row has data there.
                return [BatchProblem(None, None, (
                    f"wrong delimiter: the header (row {header_row}) is one column separated "
                    f"by {name}; expected {expected}"
                ))]  # fmt: skip
    if not records:
        return [BatchProblem(None, None, "the file has a header but no data rows")]
    return RawTable(header_row, header, records)


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


def _read_excel(path: Path) -> RawTable | list[BatchProblem]:
    """The first worksheet via openpyxl (what pandas.read_excel uses, minus the type guessing)."""
    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        # The library's message may quote the file's content: only its type is shown.
        raise InvalidInput(f"{path}: not a readable Excel .xlsx file "
                           f"({type(exc).__name__})") from None
    try:
        ws = wb.worksheets[0]
        ws.reset_dimensions()  # some writers store wrong dimensions; read what is there
        rows: Records = []
        for number, cells in enumerate(ws.iter_rows(min_row=1, min_col=1), start=1):
            rows.append((number, [
                _excel_text(c.value, getattr(c, "number_format", "") or "") for c in cells
            ]))  # fmt: skip
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, IndexError, OSError) as exc:
        raise InvalidInput(f"{path}: not a readable Excel .xlsx file "
                           f"({type(exc).__name__})") from None
    finally:
        wb.close()
    return _split_header(rows, None)
