"""Writing tables: the one CSV and Excel writer of every command and flow.

`write_table(rows, out)` writes a list of dicts (one per row; the columns follow the first
row's keys, keys only later rows have are appended) as text cells:

- a path ending in `.csv`: UTF-8 with BOM and `,` (Excel shows umlauts; Excel still drops
  leading zeros when it *opens* a CSV, so prefer `.xlsx` for humans), replaced atomically;
- a path ending in `.xlsx`: one worksheet, every cell stored as text (format `@`), so IDs keep
  their zeros and `=...` is never a formula, replaced atomically;
- a text stream (for example `sys.stdout`): CSV in the stream's own encoding.

Values become text by `cell_text`: None -> "", tuples and lists comma separated, dates as
YYYYMMDD, everything else as `str()` prints it.

CSV injection (OWASP "CSV Injection")
-------------------------------------
Values in our tables come from peers and users: PACS answers (names, descriptions), batch
file cells. A CSV cell beginning with `=`, `+`, `-`, `@`, a tab or a carriage return is run
as a formula when Excel or LibreOffice opens the file (`=HYPERLINK(...)`, `-2+3+cmd|...`).
`csv_cell` therefore writes every such cell with a leading apostrophe (`'=HYPERLINK(...)`),
which spreadsheet programs show as text. The rule is applied to every cell, header included,
whatever the Python type of the value:

- Negative numbers and text such as `-20200101` are neutralised too (`'-5`). This is
  deliberate: OWASP advises prefixing *any* cell that starts with these characters, because
  telling a harmless number from a formula means re-implementing the spreadsheet's parser in
  every locale (`-1+1`, `-1,5`, `- 5`, `-1e3`). Our own result columns hold no negative
  numbers (row numbers, counts, YYYYMMDD dates), so the cost is a visible apostrophe on rare
  PACS values.
- A value that already starts with apostrophes followed by one of those characters gets one
  more apostrophe (`'=x` -> `''=x`), so `csv_value` can undo the rule exactly: our CSV result
  files read back (as batch files, `adit_tasks.core.batch`) with the values that were written.
- `.xlsx` cells are written as text, never as formulas, and need nothing.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import TextIO

from adit_tasks.core.errors import InvalidInput

TABLE_SUFFIXES = (".csv", ".xlsx")

#: A cell a spreadsheet program would run as a formula (after our own escaping apostrophes).
_FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


def csv_cell(text: str) -> str:
    """The text as a CSV cell: with a leading apostrophe when it could run as a formula."""
    return "'" + text if _FORMULA_START.match(text) else text


def csv_value(cell: str) -> str:
    """The value of a CSV cell written by `csv_cell` (its apostrophe removed); other cells
    unchanged."""
    return cell[1:] if cell.startswith("'") and _FORMULA_START.match(cell, 1) else cell


def cell_text(value: object) -> str:
    """A value as the text of a table cell."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value  # also StrEnum members
    if isinstance(value, tuple | list):
        return ",".join(cell_text(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    return str(value)


def check_table_path(path: str | os.PathLike[str]) -> Path:
    """The path when `write_table` can write it (.csv or .xlsx); InvalidInput otherwise."""
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InvalidInput(f"{path}: results can be written as .csv or .xlsx only")
    return path


def write_table(rows: Sequence[Mapping[str, object]],
                out: str | os.PathLike[str] | TextIO) -> None:
    """Write `rows` to a .csv or .xlsx path (replaced atomically) or as CSV to a text stream.

    Every cell is text (see the module docstring); CSV cells that a spreadsheet would run as
    formulas get a leading apostrophe. InvalidInput for any other file type.
    """
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    table = [[cell_text(row.get(c)) for c in columns] for row in rows]
    if not isinstance(out, str | os.PathLike):
        _write_csv(columns, table, out)
        return
    path = check_table_path(out)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.suffix.lower() == ".csv":
            with tmp.open("w", encoding="utf-8-sig", newline="") as f:
                _write_csv(columns, table, f)
        else:
            _write_xlsx(columns, table, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_csv(columns: list[str], table: list[list[str]], stream: TextIO) -> None:
    if not columns:
        return
    writer = csv.writer(stream)
    writer.writerow([csv_cell(c) for c in columns])
    writer.writerows([csv_cell(v) for v in values] for values in table)


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


__all__ = ["TABLE_SUFFIXES", "cell_text", "check_table_path", "csv_cell", "csv_value",
           "write_table"]
