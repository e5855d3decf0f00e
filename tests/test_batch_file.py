"""Batch files: reading, validation (every problem at once, with row and column), writing
result tables (CSV cells neutralised against formula injection)."""

from __future__ import annotations

import csv
import io
import time
from datetime import date, datetime
from pathlib import Path

import openpyxl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adit_tasks.core.batch import (
    COLUMNS,
    BatchFileError,
    BatchProblem,
    BatchRow,
    read_batch_file,
)
from adit_tasks.core.errors import InvalidInput
from adit_tasks.core.tables import csv_cell, csv_value, write_table
from adit_tasks.lab.synthetic import demo_specs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UID1 = "1.2.826.0.1.3680043.8.498.1"
UID2 = "1.2.826.0.1.3680043.8.498.2"


def problems(source: str | Path, purpose: str = "query") -> list[BatchProblem]:
    with pytest.raises(BatchFileError) as info:
        read_batch_file(source, purpose)  # type: ignore[arg-type]
    return info.value.problems


def where(found: list[BatchProblem]) -> list[tuple[int | None, str | None]]:
    return [(p.row, p.column) for p in found]


# --- reading ----------------------------------------------------------------------------------


def test_pasted_text_with_comma() -> None:
    rows = read_batch_file(
        "Patient ID,patient_name,PATIENTBIRTHDATE,Modality,SeriesNumber\n"
        '  00123 ,"Müller, Björn",1942-04-13,"ct, MR","01, 3"\n',
        "query",
    )
    assert rows == [
        BatchRow(
            row=2, patient_id="00123", patient_name="Müller^Björn", birth_date="19420413",
            modalities=("CT", "MR"), series_numbers=("1", "3"),
        )
    ]  # fmt: skip


def test_semicolon_delimiter_bom_and_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    text = "PatientID;From;Until\r\n0042;01.02.2020;20200301\r\n;;\r\n0043;2.3.2021;\r\n"
    path.write_bytes(text.encode("utf-8-sig"))
    rows = read_batch_file(path, "query")
    assert [(r.row, r.patient_id, r.date_from, r.date_until) for r in rows] == [
        (2, "0042", "20200201", "20200301"),
        (4, "0043", "20210302", ""),
    ]


def test_latin1_file_with_umlauts(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("PatientName;PatientBirthDate\nGrößmann^Jörg;07.11.1962\n".encode("latin-1"))
    (row,) = read_batch_file(path, "query")
    assert row.patient_name == "Größmann^Jörg"
    assert row.birth_date == "19621107"


def test_quoted_line_break_keeps_spreadsheet_row_numbers() -> None:
    found = problems('PatientID,StudyDescription\n1,"two\nlines"\n2,x*\n', "transfer")
    assert (2, "StudyDescription") in where(found)  # control character, row of the record
    assert (3, "StudyDescription") in where(found)  # wildcard in a transfer


def test_excel_date_cell_and_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "b.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Patient ID", "PatientBirthDate", "AccessionNumber", "SeriesNumber", "Modality"])
    ws.append(["00123", datetime(1984, 6, 12), 12345.0, 2, "mr"])
    ws.append([None, None, None, None, None])  # empty row: skipped, numbering continues
    ws.append([42, date(1990, 1, 2), "12345.0", "1,2", None])
    ws.cell(row=4, column=1).number_format = "000000"  # displayed as 000042
    wb.save(path)
    rows = read_batch_file(path, "query")
    assert [(r.row, r.patient_id, r.birth_date, r.accession, r.series_numbers) for r in rows] == [
        (2, "00123", "19840612", "12345", ("2",)),
        (4, "000042", "19900102", "12345.0", ("1", "2")),
    ]
    assert rows[0].modalities == ("MR",)


def test_excel_csv_in_one_column(tmp_path: Path) -> None:
    path = tmp_path / "glued.xlsx"
    wb = openpyxl.Workbook()
    wb.active.append(["PatientID;StudyInstanceUID"])
    wb.active.append([f"1;{UID1}"])
    wb.save(path)
    (problem,) = problems(path, "transfer")
    assert problem.row is None and "wrong delimiter" in problem.message


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.xlsx"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InvalidInput, match=r"corrupt\.xlsx"):
        read_batch_file(corrupt, "query")
    with pytest.raises(InvalidInput, match=r"missing\.csv"):
        read_batch_file(tmp_path / "missing.csv", "query")
    with pytest.raises(InvalidInput, match=r"\.xls files"):
        read_batch_file(tmp_path / "old.xls", "query")
    with pytest.raises(InvalidInput, match="unsupported"):
        read_batch_file(tmp_path / "b.pdf", "query")


# --- file-level problems ----------------------------------------------------------------------


def test_tab_separated_cells_pasted_from_excel_are_read() -> None:
    rows = read_batch_file(f"PatientID\tStudyInstanceUID\n0042\t{UID1}\n", "transfer")
    assert [(r.row, r.patient_id, r.study_uid) for r in rows] == [(2, "0042", UID1)]


def test_query_result_rows_that_found_nothing_are_skipped_by_a_transfer() -> None:
    text = ("Row,Status,Message,PatientID,StudyInstanceUID\n"
            f"2,found,,P1,{UID1}\n3,not found,no study,P2,\n")
    rows = read_batch_file(text, "transfer")
    assert [(r.row, r.query_status) for r in rows] == [(2, ""), (3, "not found")]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty"),
        (b"\xef\xbb\xbf\r\n  \r\n", "empty"),
        (b"PatientID,StudyInstanceUID\n", "no data rows"),
        (b"PatientID,StudyInstanceUID\n,\n\n", "no data rows"),
    ],
)
def test_file_level_problems(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "b.csv"
    path.write_bytes(content)
    with pytest.raises(BatchFileError) as info:
        read_batch_file(path, "transfer")
    (problem,) = info.value.problems
    assert (problem.row, problem.column) == (None, None)
    assert expected in problem.message
    assert str(info.value).startswith(f"{path}: 1 problem")
    if expected == "tabs":
        assert "',' or ';'" in problem.message


# --- header -----------------------------------------------------------------------------------


def test_unknown_and_duplicate_columns_and_result_columns() -> None:
    found = problems(
        "PatientID,Patient Nmae,Foo,patient_id,Status,StudyDate,NumberOfStudyRelatedInstances\n"
        "1,x,y,2,ok,20200101,3\n"
    )
    assert where(found) == [(1, "B"), (1, "C"), (1, "D")]
    assert "did you mean PatientName?" in found[0].message
    assert "known columns: PatientID" in found[1].message
    assert "duplicate column: column A is also PatientID" in found[2].message


def test_cells_outside_the_header() -> None:
    found = problems("PatientID,AccessionNumber\n1,A,\n2,B,oops\n")
    assert where(found) == [(3, "C")]


MARKER = "GEHEIM-4711"  # stands for patient data in a header or beyond it


def test_header_and_overflow_cells_show_only_column_and_length() -> None:
    """A file without a header row has patient data in row 1; a stray delimiter pushes it
    beyond the header: problems name the column letter and the length, never the value."""
    found = problems(
        f"PatientID,{MARKER},,{MARKER}x\n"
        f"1,,,\n"
        f"2,,{MARKER},,{MARKER}\n"
    )
    assert [str(p) for p in found] == [
        "row 1, column B: unknown column header <11 characters> (known columns: "
        + ", ".join(COLUMNS) + ")",
        "row 1, column C: values under an empty header",
        "row 1, column D: unknown column header <12 characters> (known columns: "
        + ", ".join(COLUMNS) + ")",
        "row 3, column E: a value <11 characters> outside the header's 4 columns "
        "(a delimiter inside an unquoted cell?)",
    ]
    with pytest.raises(BatchFileError) as info:
        read_batch_file(f"{MARKER},0042,19600101\n{MARKER},0043,19600102\n", "query")
    assert [(p.row, p.column) for p in info.value.problems] == [
        (1, "A"), (1, "B"), (1, "C"), (2, "PatientID")]
    assert MARKER not in str(info.value) and "0042" not in str(info.value)


def test_one_column_header_is_not_repeated() -> None:
    (problem,) = problems(f'"{MARKER},PatientID"\n"1,2"\n')
    assert problem.row is None and "wrong delimiter" in problem.message
    assert "row 1" in problem.message and MARKER not in problem.message


# --- cells ------------------------------------------------------------------------------------


def test_bad_dates() -> None:
    found = problems(
        "PatientID,PatientBirthDate,From,Until\n"
        "1,31.02.2020,,\n"
        "2,,2020-13-01,2020/01/01\n"
        "3,,2021-01-01,2020-12-31\n"
        "4,19421313,20200101,20200101\n"
    )
    assert where(found) == [
        (2, "PatientBirthDate"), (3, "From"), (3, "Until"), (4, "Until"), (5, "PatientBirthDate"),
    ]  # fmt: skip
    # Identifying values stay out of problems (they reach logs): row, column and length only.
    assert str(found[0]) == (
        "row 2, column PatientBirthDate: invalid date '<10 characters>' "
        "(use YYYY-MM-DD, YYYYMMDD or DD.MM.YYYY)"
    )
    assert "before From '2021-01-01'" in found[3].message


def test_problems_never_repeat_identifying_values() -> None:
    found = problems(
        "PatientID,PatientName,PatientBirthDate,AccessionNumber,Pseudonym\n"
        "GEHEIM*1,Geheimnis*^Anna,31.02.1961,ACC*SECRET,P1\n"
        "GEHEIM*1,,,,P2\n"
    )
    assert {p.column for p in found} >= {"PatientID", "PatientBirthDate", "AccessionNumber"}
    text = "\n".join(str(p) for p in found)
    for value in ("GEHEIM", "Geheimnis", "31.02.1961", "SECRET"):
        assert value not in text


def test_bad_uids() -> None:
    found = problems(
        "PatientID,StudyInstanceUID,SeriesInstanceUID\n"
        f"1,{UID1},1.2.03\n"
        f"2,1.2.abc,{UID2}\n"
        f"3,1.{'2' * 70},\n"
        f"4,{UID1}.,\n",
        "transfer",
    )
    assert where(found) == [
        (2, "SeriesInstanceUID"), (3, "StudyInstanceUID"), (4, "StudyInstanceUID"),
        (5, "StudyInstanceUID"),
    ]  # fmt: skip


def test_wildcards_only_in_name_and_descriptions_of_queries() -> None:
    text = (
        "PatientID,PatientName,PatientBirthDate,StudyDescription,SeriesDescription,AccessionNumber\n"
        "1*,,,,,\n"
        ",Mül*,19420413,CT*,t1?,\n"
        ",,,,,ACC?\n"
    )
    assert where(problems(text)) == [(2, "PatientID"), (4, "AccessionNumber")]
    transfer = problems(text, "transfer")
    assert {(3, "PatientName"), (3, "StudyDescription"), (3, "SeriesDescription")} <= set(
        where(transfer)
    )


def test_modalities_series_numbers_and_pseudonyms() -> None:
    found = problems(
        "PatientID,Modality,SeriesNumber,Pseudonym\n"
        "1,CT/MR,1-3,a/b\n"
        "2,TOOLONGMODALITYCODE,x,..\n"
        "3,CT,99999999999,ok\n"
        f"4,,,{'p' * 65}\n"
    )
    assert where(found) == [
        (2, "Modality"), (2, "SeriesNumber"), (2, "Pseudonym"),
        (3, "Modality"), (3, "SeriesNumber"), (3, "Pseudonym"),
        (4, "SeriesNumber"), (5, "Pseudonym"),
    ]  # fmt: skip


def test_conflicting_pseudonyms_name_both_rows() -> None:
    found = problems(
        f"PatientID,StudyInstanceUID,Pseudonym\n"
        f"A,{UID1},P1\n"
        f"A,{UID2},P2\n"
        f"B,{UID1},P1\n"
        f"C,{UID2},P3\n"
        f"C,{UID1},P3\n",
        "transfer",
    )
    assert where(found) == [(3, "Pseudonym"), (4, "Pseudonym")]
    assert "'P2' here but 'P1' in row 2" in found[0].message
    assert "PatientID '<1 characters>' here but '<1 characters>' in row 2" in found[1].message


def test_required_values_per_purpose() -> None:
    query = problems(
        "PatientID,PatientName,PatientBirthDate,AccessionNumber,StudyInstanceUID,Modality\n"
        ",,,,,CT\n"
        ",Doe^John,,,,\n"
        ",,19700101,,,\n"
        ",Doe^John,19700101,,,\n"
        ",,,A1,,\n"
        f",,,,{UID1},\n"
    )
    assert where(query) == [(2, "PatientID"), (3, "PatientBirthDate"), (4, "PatientName")]
    transfer = problems(
        f"PatientID,StudyInstanceUID,SeriesInstanceUID\n,{UID1},\n1,,{UID2}\n2,,\n",
        "transfer",
    )
    assert where(transfer) == [(2, "PatientID"), (3, "StudyInstanceUID"), (4, "StudyInstanceUID")]
    assert "SeriesInstanceUID needs" in transfer[1].message


def test_all_problems_at_once_and_message_cap() -> None:
    text = "PatientID,PatientBirthDate\n" + "".join(f"{i},99.99.2020\n" for i in range(60))
    with pytest.raises(BatchFileError) as info:
        read_batch_file(text, "query")
    assert len(info.value.problems) == 60
    lines = str(info.value).splitlines()
    assert lines[0] == "pasted text: 60 problems in the batch file"
    assert len(lines) == 1 + 50 + 1 and lines[-1].strip() == "... and 10 more"


# --- size -------------------------------------------------------------------------------------


def test_ten_thousand_rows(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f, delimiter=";")
        w.writerow(["PatientID", "PatientName", "PatientBirthDate", "From", "Until", "Modality",
                    "StudyInstanceUID", "Pseudonym"])  # fmt: skip
        for i in range(10_000):
            w.writerow([f"{i:08d}", f"Müller^Anna{i}", f"{(i % 28) + 1:02d}.03.1960",
                        "2019-01-01", "20231231", "CT,MR", f"{UID1}.{i}", f"R{i:05d}"])  # fmt: skip
    start = time.perf_counter()
    rows = read_batch_file(path, "transfer")
    elapsed = time.perf_counter() - start
    print(f"\n10,000-row CSV read and validated in {elapsed:.3f} s")
    assert len(rows) == 10_000 and rows[-1].row == 10_001 and rows[0].patient_id == "00000000"
    text = path.read_text(encoding="utf-8-sig").replace("CT,MR", "C T", 1)
    start = time.perf_counter()
    assert where(problems(text, "transfer")) == [(2, "Modality")]
    print(f"10,000-row pasted text with one problem in {time.perf_counter() - start:.3f} s")


# --- writing and round trip -------------------------------------------------------------------


RESULT_ROWS: list[dict[str, object]] = [
    {
        "Row": 2, "Status": "ok", "Message": "", "PatientID": "00123",
        "PatientName": "Müller^Björn", "PatientBirthDate": "19420413", "StudyDate": "20200606",
        "ModalitiesInStudy": ("CT", "MR"), "AccessionNumber": "0007",
        "NumberOfStudyRelatedInstances": 12, "StudyInstanceUID": UID1, "Pseudonym": "=1+1",
    },
    {
        "Row": 3, "Status": "ok", "Message": None, "PatientID": "0000",
        "PatientName": "Weiß^Ingrid", "PatientBirthDate": date(1951, 2, 3), "StudyDate": "",
        "ModalitiesInStudy": "MR", "AccessionNumber": "", "NumberOfStudyRelatedInstances": None,
        "StudyInstanceUID": UID2, "Pseudonym": "P-2",
    },
]  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_results_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"results{suffix}"
    write_table(RESULT_ROWS, path)
    rows = read_batch_file(path, "transfer")
    assert [
        (r.row, r.patient_id, r.patient_name, r.birth_date, r.accession, r.study_uid, r.pseudonym)
        for r in rows
    ] == [
        (2, "00123", "Müller^Björn", "19420413", "0007", UID1, "=1+1"),
        (3, "0000", "Weiß^Ingrid", "19510203", "", UID2, "P-2"),
    ]


def test_results_csv_is_excel_friendly(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    write_table(RESULT_ROWS, path)
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbfRow,Status,Message,PatientID,")
    assert "Müller^Björn" in data.decode("utf-8-sig")
    assert '"CT,MR"' in data.decode("utf-8-sig")


def test_results_bad_extension(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"csv or \.xlsx"):
        write_table(RESULT_ROWS, tmp_path / "r.json")


# --- CSV injection: cells a spreadsheet would run as formulas ----------------------------------

#: Values as a PACS or a batch file may send them, each in a column where it is valid.
HOSTILE: dict[str, str] = {
    "StudyDescription": '=HYPERLINK("http://evil.example","click")',
    "PatientName": "+1",
    "PatientID": "-1+1",
    "AccessionNumber": "@SUM(1)",
    "SeriesDescription": "\t=1+1",
    "Pseudonym": "'=x",  # already apostrophed: one more, so reading back is exact
}
HOSTILE_ROW: dict[str, object] = {
    "Row": 2, "Status": "found", "Message": "-5", "StudyInstanceUID": UID1,
    "Modality": "CT", "SeriesNumber": "3", **HOSTILE,
}  # fmt: skip


def raw_csv(path_or_text: Path | str) -> list[dict[str, str]]:
    """The cells as a spreadsheet program gets them (the CSV's text, nothing undone)."""
    text = (path_or_text.read_text(encoding="utf-8-sig") if isinstance(path_or_text, Path)
            else path_or_text)
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_cells_that_could_run_as_formulas_get_an_apostrophe(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    write_table([HOSTILE_ROW, {**HOSTILE_ROW, "Row": 3, "Message": "normal"}], path)
    first, second = raw_csv(path)
    for column, value in HOSTILE.items():
        assert first[column] == "'" + value, column
    # Negative numbers too, deliberately (OWASP: any cell starting with = + - @ tab CR).
    assert first["Message"] == "'-5"
    # Normal values are unchanged.
    assert (first["Row"], first["Status"], first["StudyInstanceUID"], first["Modality"],
            second["Message"]) == ("2", "found", UID1, "CT", "normal")
    for row in (first, second):
        for column, cell in row.items():
            assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), (column, cell)


def test_neutralised_csv_reads_back_exactly_and_xlsx_stays_text(tmp_path: Path) -> None:
    for suffix in (".csv", ".xlsx"):
        path = tmp_path / f"r{suffix}"
        write_table([{k: v for k, v in HOSTILE_ROW.items() if k != "SeriesDescription"}], path)
        (row,) = read_batch_file(path, "query")
        assert (row.study_description, row.patient_name, row.patient_id, row.accession,
                row.pseudonym) == (HOSTILE["StudyDescription"], "+1", "-1+1", "@SUM(1)",
                                   "'=x"), suffix
    sheet = openpyxl.load_workbook(tmp_path / "r.xlsx").active
    header = [c.value for c in sheet[1]]
    cell = sheet.cell(row=2, column=header.index("StudyDescription") + 1)
    assert (cell.value, cell.data_type) == (HOSTILE["StudyDescription"], "s")


def test_csv_to_a_text_stream_for_the_cli() -> None:
    stream = io.StringIO()
    write_table([HOSTILE_ROW, {"Row": 3, "Extra": ("CT", "MR")}], stream)
    text = stream.getvalue()
    assert not text.startswith("\ufeff")
    first, second = raw_csv(text)
    assert first["StudyDescription"] == "'" + HOSTILE["StudyDescription"]
    assert (second["Row"], second["Extra"], second["PatientID"]) == ("3", "CT,MR", "")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_csv_cell_is_never_a_formula_and_is_undone_exactly(value: str) -> None:
    cell = csv_cell(value)
    assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r")
    assert csv_value(cell) == value
    assert cell == value or cell == "'" + value


# --- examples ---------------------------------------------------------------------------------


def test_examples_are_valid_and_match_the_demo_data() -> None:
    specs = demo_specs(n_patients=4, seed=1)
    queries = read_batch_file(EXAMPLES / "batch_query.csv", "query")
    transfers = read_batch_file(EXAMPLES / "batch_transfer.csv", "transfer")
    assert queries and transfers
    by_uid = {s.study_uid: s for s in specs}
    for t in transfers:
        assert by_uid[t.study_uid].patient_id == t.patient_id
    ids = {s.patient_id for s in specs}
    accessions = {s.accession for s in specs}
    names = {(s.patient_name, s.birth_date) for s in specs}
    for q in queries:
        assert (
            q.patient_id in ids
            or q.accession in accessions
            or (q.patient_name, q.birth_date) in names
        )


# --- property: never anything but BatchFileError ----------------------------------------------

GOOD = {
    "PatientID": st.sampled_from(["00123", "PAT0010001", "A-1"]),
    "PatientName": st.sampled_from(["Müller^Björn", "Doe, John", "Sch*"]),
    "PatientBirthDate": st.sampled_from(["1942-04-13", "19420413", "13.04.1942"]),
    "AccessionNumber": st.sampled_from(["ACC1", "0007"]),
    "From": st.sampled_from(["2020-01-01", "20190101"]),
    "Until": st.sampled_from(["2024-12-31", "31.12.2024"]),
    "Modality": st.sampled_from(["CT", "ct,MR"]),
    "StudyDescription": st.sampled_from(["CT Abdomen", "MRT*"]),
    "SeriesDescription": st.sampled_from(["t1_tse", "?1*"]),
    "SeriesNumber": st.sampled_from(["1", "1,2"]),
    "StudyInstanceUID": st.sampled_from([UID1, UID2]),
    "SeriesInstanceUID": st.sampled_from([UID1 + ".1", UID2 + ".7"]),
    "Pseudonym": st.sampled_from(["R1", "R2"]),
}
BROKEN = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["31.02.2020", "1.2.03", "*", "a\\b", "x\ny", '"', "a,b", "a;b", "\t", "\x00", "..",
         " ", "9" * 80, "1-3", "2021-13-01", "\ufeff", "C T", "¿ñ?"]
    ),
)  # fmt: skip
HEADERS = st.lists(
    st.one_of(st.sampled_from([*COLUMNS, "Status", "StudyDate", "Foo", "patient id", ""])),
    min_size=1,
    max_size=7,
)


@st.composite
def batch_texts(draw: st.DrawFn) -> str:
    header = draw(HEADERS)
    n_rows = draw(st.integers(0, 6))
    rows = []
    for _ in range(n_rows):
        row = []
        for name in header:
            good = GOOD.get(name, st.just("x"))
            row.append(draw(st.one_of(good, good, st.just(""), BROKEN)))
        if draw(st.booleans()):
            row.append(draw(BROKEN))  # a cell beyond the header
        rows.append(row)
    out = io.StringIO()
    writer = csv.writer(out, delimiter=draw(st.sampled_from([",", ";", "\t"])))
    writer.writerow(header)
    writer.writerows(rows)
    text = out.getvalue()
    if draw(st.booleans()):  # damage the CSV itself
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(['"', "\n", ";", ",", "\r", "\x00"])) + text[pos:]
    return text + "\n"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=batch_texts(), purpose=st.sampled_from(["query", "transfer"]))
def test_any_input_gives_rows_or_located_problems(text: str, purpose: str) -> None:
    try:
        rows = read_batch_file(text, purpose)  # type: ignore[arg-type]
    except BatchFileError as exc:
        assert exc.problems
        for p in exc.problems:
            file_level = p.row is None and p.column is None
            assert file_level or (isinstance(p.row, int) and p.row >= 1 and p.column), p
        return
    assert all(isinstance(r, BatchRow) and r.row >= 2 for r in rows)
    assert len({r.row for r in rows}) == len(rows)
