"""The one date parser: the spellings people type, ranges with open ends, clear errors."""

from __future__ import annotations

import datetime as dt

import pytest

from adit_tasks.core.dates import date_or_none, parse_date, parse_date_range
from adit_tasks.core.errors import InvalidInput


@pytest.mark.parametrize("text,expected", [
    ("20240102", ("20240102", "20240102")),
    ("2024-01-02", ("20240102", "20240102")),
    ("2.1.2024", ("20240102", "20240102")),
    ("20240101-20240131", ("20240101", "20240131")),
    ("2024-01-01-2024-01-31", ("20240101", "20240131")),
    ("2024-01-01..2024-01-31", ("20240101", "20240131")),
    ("01.01.2024 - 31.01.2024", ("20240101", "20240131")),
    ("20240101-", ("20240101", "")),
    ("-20240131", ("", "20240131")),
])
def test_date_ranges(text, expected) -> None:
    assert parse_date_range(text) == expected


@pytest.mark.parametrize("text", ["2024-13", "yesterday", "20240131-20240101", "2024011",
                                  "-", "20240230", "2024-01-01-"+"x"])
def test_bad_dates_are_invalid_input(text) -> None:
    with pytest.raises(InvalidInput):
        parse_date_range(text)


def test_single_dates() -> None:
    assert parse_date("07.11.1962") == dt.date(1962, 11, 7)
    assert date_or_none("1962-11-07") == dt.date(1962, 11, 7)
    assert date_or_none("31.02.2020") is None
    with pytest.raises(InvalidInput, match="birth date"):
        parse_date("soon", "birth date")
