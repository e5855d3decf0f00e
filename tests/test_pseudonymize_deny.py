"""Deny by default: what the PS3.15 table does not list is removed or replaced unless the keep
list names it; the keep list is documented next to the table; the pixel data element leaves
exactly as it came."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag
from pydicom.uid import ImplicitVRLittleEndian

from adit_tasks.core import pseudonymize as pseudonymize_module
from adit_tasks.core.deid_rules import keep_list, profile_table, rule_for
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.part10 import element_end, split
from adit_tasks.core.pseudonymize import PseudonymizationOptions, Pseudonymizer
from tests.dicom_builders import encoded, item, minimal_dataset, pseudonymized_bytes, raw

SECRET = "test-secret-of-the-project"
DATA = Path(pseudonymize_module.__file__).parent / "data"
DOC = Path(__file__).parents[1] / "docs" / "pseudonymization.md"
TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE"}
DECLARED = {0x00120063}  # DeidentificationMethod: ADIT writes it


def _unlisted(vrs: set[str]) -> list[tuple[int, str]]:
    """Dictionary attributes the table does not list, with one of `vrs`."""
    out = []
    for tag, (vr, _, _, _, keyword) in sorted(DicomDictionary.items()):
        first = vr.split(" or ")[0]
        if first in vrs and rule_for(tag) is None and keyword and tag >> 16 not in (0, 2):
            out.append((tag, first))
    return out


# --- text the table does not list ------------------------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean", "no-clean"])
def test_every_unlisted_text_attribute_is_removed_unless_the_keep_list_names_it(clean):
    options = PseudonymizationOptions(clean_descriptors=clean)
    p = Pseudonymizer(SECRET, options)
    kept_list = keep_list()
    wrong = []
    attributes = _unlisted(TEXT_VRS)
    assert len(attributes) > 400
    for tag, vr in attributes:
        ds = minimal_dataset("Doe^Johnathan")
        value = "http://x.example/Johnathan" if vr == "UR" else "KEEPME Johnathan"
        ds.add_new(tag, vr, "KEEPME" if vr == "AE" else value)
        p.pseudonymize_dataset(ds)
        if tag in DECLARED:
            continue
        kind = kept_list.get(tag)
        kept = kind == "technical" or (kind == "descriptor" and clean)
        elem = ds.get(tag)
        rest = "x.example" if vr == "UR" else "keepme"
        if kept and (elem is None or "johnathan" in str(elem.value).casefold()
                     or rest not in str(elem.value).casefold()):
            wrong.append(f"{keyword_for_tag(tag)}: should stay, cleaned: {elem}")
        if not kept and elem is not None:
            wrong.append(f"{keyword_for_tag(tag)} ({vr}): should be removed: {elem.value!r}")
    assert not wrong, "\n".join(wrong)


def test_person_names_the_table_does_not_list_are_replaced():
    for tag, vr in _unlisted({"PN"}):
        ds = minimal_dataset()
        ds.add_new(tag, vr, "Schäfer^Jürgen")
        Pseudonymizer(SECRET).pseudonymize_dataset(ds)
        assert str(ds[tag].value) == "ANONYMIZED", keyword_for_tag(tag)


@pytest.mark.parametrize("dates", ["shift", "keep", "remove"])
def test_every_unlisted_date_and_time_follows_the_dates_option(dates):
    p = Pseudonymizer(SECRET, PseudonymizationOptions(dates=dates))
    values = {"DA": "20200102", "DT": "20200102030405", "TM": "030405"}
    shifted = (dt.date(2020, 1, 2) - dt.timedelta(days=p.date_offset("PID12345"))
               ).strftime("%Y%m%d")
    wrong = []
    attributes = _unlisted({"DA", "DT", "TM"})
    assert len(attributes) >= 10
    for tag, vr in attributes:
        ds = minimal_dataset()
        ds.add_new(tag, vr, values[vr])
        p.pseudonymize_dataset(ds)
        elem = ds.get(tag)
        got = None if elem is None else str(elem.value)
        want = {"keep": values[vr], "remove": None,
                "shift": {"DA": shifted, "DT": shifted + "030405", "TM": "030405"}[vr]}[dates]
        if got != want:
            wrong.append(f"{keyword_for_tag(tag)} ({vr}): {got!r}, want {want!r}")
    assert not wrong, "\n".join(wrong)


def test_keep_list_technical_attributes_stay_as_they_are_when_clean():
    ds = minimal_dataset("Doe^Johnathan")
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "SOMATOM Force"
    ds.ConvolutionKernel = "Br40d"
    ds.RescaleType = "HU"
    ds.SoftwareVersions = "syngo CT VA50A"
    ds.ProcedureCodeSequence = [item(CodeValue="ZDE0Z", CodingSchemeDesignator="L",
                                     CodeMeaning="CT Thorax nativ")]
    out = dcmread(io.BytesIO(pseudonymized_bytes(ds)))
    assert (out.Manufacturer, out.ManufacturerModelName, out.ConvolutionKernel,
            out.RescaleType, out.SoftwareVersions) == (
        "SIEMENS", "SOMATOM Force", "Br40d", "HU", "syngo CT VA50A")
    assert out.ProcedureCodeSequence[0].CodeMeaning == "CT Thorax nativ"


def test_unknown_public_tags_and_group_lengths_are_removed_in_every_encoding():
    ds = minimal_dataset()
    raw(ds, 0x00109999, "LO", b"harmless")
    raw(ds, 0x00180000, "UL", struct.pack("<L", 1234))  # a group length
    ds.add_new(0x00200099, "UN", b"\x01\x02")
    for syntax in ("1.2.840.10008.1.2.1", ImplicitVRLittleEndian):
        out = dcmread(io.BytesIO(pseudonymized_bytes(encoded(ds, syntax))))
        assert not {0x00109999, 0x00180000, 0x00200099} & set(out.keys())


def test_a_sequence_sent_as_un_is_removed_rather_than_guessed_at():
    ds = minimal_dataset("Doe^Johnathan")
    inner = b"\x08\x00\x04\x01" + struct.pack("<L", 10) + b"Johnathan "  # CodeMeaning
    body = b"\xfe\xff\x00\xe0" + struct.pack("<L", len(inner)) + inner
    # ConceptNameCodeSequence, explicit VR UN, appended last (its tag sorts last)
    data = encoded(ds) + b"\x40\x00\x43\xa0UN\0\0" + struct.pack("<L", len(body)) + body
    assert dcmread(io.BytesIO(data)).get_item(0x0040A043).VR == "UN"
    out = pseudonymized_bytes(data)
    assert 0x0040A043 not in dcmread(io.BytesIO(out))
    assert b"Johnathan" not in out


# --- the keep list, documented next to the table ---------------------------------------------


def test_the_keep_list_names_only_text_attributes_the_table_does_not_list():
    rows = list(csv.DictReader((DATA / "keep_list.csv").open(encoding="utf-8")))
    assert len(rows) == len(keep_list()) > 100
    exact, _ = profile_table()
    for row in rows:
        tag = int(row["tag"].strip("()").replace(",", ""), 16)
        assert tag not in exact, row
        assert keyword_for_tag(tag) == row["keyword"], row
        assert dictionary_VR(tag) == row["vr"] and row["vr"] in TEXT_VRS, row
        assert row["kind"] in ("technical", "descriptor"), row


def test_the_keep_list_is_documented_in_full():
    doc = DOC.read_text("utf-8")
    documented = set(re.findall(r"`([A-Za-z0-9]+)`", doc))
    missing = [kw for kw in (keyword_for_tag(t) for t in keep_list()) if kw not in documented]
    assert not missing, missing


# --- pixel data: the element's bytes as received ---------------------------------------------


def _pixel_element(data: bytes) -> bytes:
    parts = split(data)
    assert parts.pixel is not None
    start, end = parts.pixel
    assert end == element_end(data, start, parts.implicit, parts.little)
    return data[start:end]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "JPEG2000-embedded-sequence-delimiter.dcm",
                                  "SC_rgb_rle_2frame.dcm", "rtdose_rle.dcm"])
def test_the_pixel_data_element_leaves_byte_for_byte(name):
    data = Path(get_testdata_file(name)).read_bytes()
    out = Pseudonymizer(SECRET, PseudonymizationOptions(allow_burned_in=True)).pseudonymize(
        DicomInstance.from_bytes(data))
    assert _pixel_element(out.data) == _pixel_element(data)
    assert out.transfer_syntax_uid == dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID


def test_the_pixel_data_is_not_parsed_or_copied_through_pydicom(monkeypatch):
    """The header is parsed up to the pixel data; the element is spliced back."""
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    seen = []
    real = pseudonymize_module.part10.split

    def spy(raw_data):
        parts = real(raw_data)
        seen.append(0x7FE00010 in parts.dataset)
        return parts

    monkeypatch.setattr(pseudonymize_module.part10, "split", spy)
    Pseudonymizer(SECRET).pseudonymize(DicomInstance.from_bytes(data))
    assert seen == [False]
