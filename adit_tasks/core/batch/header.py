"""A batch file's columns: which header cell names which column, and the table as a frame.

Headers are matched ignoring case, spaces and underscores (`patient id` = `PatientID`). The
columns a batch query writes that are not inputs (`IGNORED_COLUMNS`) are accepted and
ignored, so a query result is a transfer input. Unknown and duplicate headers, values under
an empty header and cells beyond the header are problems; they name the column by its
spreadsheet letter and the cell only by its length (a file without a header row has patient
data in row 1).
"""

from __future__ import annotations

import difflib
import re

import pandas as pd

from adit_tasks.core.batch.model import (
    COLUMNS,
    IGNORED_COLUMNS,
    BatchProblem,
    column_letter,
    length,
)
from adit_tasks.core.batch.read import RawTable

ROW = "_row"  # the frame's column holding the spreadsheet row number


def _normalize_header(name: str) -> str:
    return re.sub(r"[\s_]+", "", name.replace("\ufeff", "")).lower()


_CANONICAL = {_normalize_header(c): c for c in (*COLUMNS, *IGNORED_COLUMNS)}


def map_header(table: RawTable) -> tuple[dict[int, str], list[BatchProblem]]:
    """Column index -> known column name (ignored columns left out), and header problems."""
    problems: list[BatchProblem] = []
    index_of: dict[int, str] = {}
    seen: dict[str, int] = {}
    has_value = [False] * len(table.header)
    for _, cells in table.records:
        for i, cell in enumerate(cells[: len(table.header)]):
            if cell:
                has_value[i] = True
    for i, raw in enumerate(table.header):
        letter = column_letter(i)
        if not raw:
            if has_value[i]:
                problems.append(BatchProblem(
                    table.header_row, letter, "values under an empty header"
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
                table.header_row, letter, f"unknown column header {length(raw)} ({hint})"
            ))  # fmt: skip
            continue
        if name in seen:
            problems.append(BatchProblem(
                table.header_row, letter,
                f"duplicate column: column {column_letter(seen[name])} is also {name}"
            ))  # fmt: skip
            continue
        seen[name] = i
        if name in COLUMNS or name == "Status":
            index_of[i] = name
    return index_of, problems


def frame(table: RawTable, index_of: dict[int, str]) -> tuple[pd.DataFrame, list[BatchProblem]]:
    """A DataFrame of the known columns (str, absent ones empty) plus Status and the row
    number (`ROW`); problems for cells beyond the header."""
    width = len(table.header)
    problems: list[BatchProblem] = []
    data: dict[str, list[str]] = {name: [] for name in index_of.values()}
    numbers: list[int] = []
    for number, cells in table.records:
        for j in range(width, len(cells)):
            if cells[j]:
                problems.append(BatchProblem(number, column_letter(j), (
                    f"a value {length(cells[j])} outside the header's {width} columns "
                    "(a delimiter inside an unquoted cell?)"
                )))  # fmt: skip
        numbers.append(number)
        for i, name in index_of.items():
            data[name].append(cells[i] if i < len(cells) else "")
    df = pd.DataFrame({name: pd.Series(values, dtype=str) for name, values in data.items()})
    for name in (*COLUMNS, "Status"):  # absent columns are empty
        if name not in df:
            df[name] = pd.Series([""] * len(numbers), dtype=str)
    df[ROW] = numbers
    return df, problems
