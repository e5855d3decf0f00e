"""Batch files: the spreadsheets of patients and studies that research teams get from clinicians.

A batch file is a `.csv` or `.xlsx` table with one header row and one row per query or transfer.
`read_batch_file` reads and validates it completely *before* anything runs and reports every
problem at once (`BatchFileError.problems`), each naming the row as the spreadsheet shows it
(header = row 1, first data row = row 2) and the column. Result tables (for example a batch
query's output, which is a valid transfer input) are written by `adit_tasks.core.tables`.

Modules, one idea each:

- `model`: the columns, `BatchRow`, `BatchProblem`, `BatchFileError`, how values show in problems;
- `read`: the cells of a CSV file, pasted CSV text or an Excel sheet, as text;
- `header`: header cells to columns, the table as a frame;
- `rows`: validation into `BatchRow`s (`read_batch_file`).

Format
------
- CSV: delimiter `,`, `;` or tab (whichever occurs most often in the header line, so German
  Excel exports and cells pasted from Excel work), UTF-8 with or without BOM, Latin-1 when the
  file is not valid UTF-8. Quoted cells may hold the delimiter (`"CT,MR"`). A `str` containing
  a line break is pasted CSV text, any other `str` (or `Path`) a file name.
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

Problems never show a cell's value: a bad cell may hold anything (a name typed under Modality,
an ID pasted into StudyInstanceUID, a file without a header row), and problems reach Prefect's
records (state messages, logs, events). A cell appears by its row, its column (name or
spreadsheet letter) and its length; the only values repeated are a plain pseudonym in a
pseudonym conflict and the valid From/Until dates of a reversed range.
"""

from __future__ import annotations

from pathlib import Path

from adit_tasks.core.batch.model import (
    COLUMNS,
    IGNORED_COLUMNS,
    BatchFileError,
    BatchProblem,
    BatchRow,
    Purpose,
)


def read_batch_file(source: str | Path, purpose: Purpose) -> list[BatchRow]:
    """`rows.read_batch_file` (its docstring says what it does), imported on first use: its
    pandas costs ~0.3 s of import, and every `adit` command imports this package (`BatchRow`)
    while only batch flows read a file."""
    from adit_tasks.core.batch.rows import read_batch_file as read

    return read(source, purpose)


__all__ = [
    "COLUMNS",
    "IGNORED_COLUMNS",
    "BatchFileError",
    "BatchProblem",
    "BatchRow",
    "Purpose",
    "read_batch_file",
]
