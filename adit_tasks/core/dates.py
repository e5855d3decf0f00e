"""Dates as people type them, and as DICOM writes them (YYYYMMDD): the one parser.

Accepted spellings: `YYYY-MM-DD`, `YYYYMMDD`, `DD.MM.YYYY` (also with one-digit day or month).
A range is `FROM-UNTIL`, `FROM..UNTIL` or `FROM - UNTIL`, either end may be left open.
"""

from __future__ import annotations

import datetime as dt
import re

from adit_tasks.core.errors import InvalidInput

DICOM_DATE = "%Y%m%d"
ONE_DATE_HELP = "use YYYY-MM-DD, YYYYMMDD or DD.MM.YYYY"
DATE_HELP = f"{ONE_DATE_HELP}; ranges FROM-UNTIL"

_SPELLINGS = (
    (re.compile(r"(\d{4})-(\d{2})-(\d{2})"), (1, 2, 3)),
    (re.compile(r"(\d{4})(\d{2})(\d{2})"), (1, 2, 3)),
    (re.compile(r"(\d{1,2})\.(\d{1,2})\.(\d{4})"), (3, 2, 1)),
)
_ONE_DATE = r"\d{4}-\d{2}-\d{2}|\d{8}|\d{1,2}\.\d{1,2}\.\d{4}"
_RANGE = re.compile(rf"\s*({_ONE_DATE})?\s*(?:-|\.\.|\s-\s)\s*({_ONE_DATE})?\s*")


def _length(text: str) -> str:
    # The value is not repeated: a birth date typed into a form would land in run states.
    return f"{len(text.strip())} characters"


def date_or_none(text: str) -> dt.date | None:
    """The date of an accepted spelling, None when the text is not one."""
    text = text.strip()
    for pattern, (y, m, d) in _SPELLINGS:
        match = pattern.fullmatch(text)
        if match:
            try:
                return dt.date(int(match[y]), int(match[m]), int(match[d]))
            except ValueError:
                return None
    return None


def parse_date(text: str, what: str = "date") -> dt.date:
    """The date, or InvalidInput naming what was wrong."""
    day = date_or_none(text)
    if day is None:
        raise InvalidInput(f"invalid {what} ({_length(text)}): {DATE_HELP}")
    return day


def dicom_date(day: dt.date) -> str:
    return day.strftime(DICOM_DATE)


def parse_date_range(text: str, what: str = "date") -> tuple[str, str]:
    """A date or a range as DICOM dates (from, until); an open end is ''."""
    if date_or_none(text) is not None:
        one = dicom_date(parse_date(text, what))
        return one, one
    match = _RANGE.fullmatch(text)
    if not match or not (match[1] or match[2]):
        raise InvalidInput(f"invalid {what} ({_length(text)}): {DATE_HELP}")
    start = dicom_date(parse_date(match[1], what)) if match[1] else ""
    end = dicom_date(parse_date(match[2], what)) if match[2] else ""
    if start and end and start > end:
        raise InvalidInput(f"invalid {what} range ({_length(text)}): start is after end")
    return start, end
