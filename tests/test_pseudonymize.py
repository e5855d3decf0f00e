"""Adversarial tests of the PS3.15 pseudonymizer, named after the data they feed it."""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime as dt
import io
import itertools
from functools import cache
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from adit_tasks.core import pseudonymize as pseudonymize_module
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.pseudonymize import (
    BurnedInAnnotation,
    PseudonymizationOptions,
    Pseudonymizer,
    profile_table,
)
from adit_tasks.lab.synthetic import (
    OPERATORS,
    PRIVATE_CREATOR,
    STUDY_REF_SOP_CLASS,
    StudySpec,
    uid_for,
)
from tests.dicom_builders import (
    CT_SOP_CLASS,
    DEEP_PRIVATE_CREATOR,
    identifiers_of,
    identifying_datasets,
    item,
    minimal_dataset,
    small_ct_spec,
    to_bytes,
    to_instance,
    utf8_ct_spec,
)

SECRET = "test-secret-of-the-project"
TABLE_CSV = Path(pseudonymize_module.__file__).parent / "data" / "ps315_e1.csv"


# --- helpers --------------------------------------------------------------------------------


@cache
def _study(which: str) -> tuple[StudySpec, tuple[bytes, ...]]:
    spec = small_ct_spec() if which == "latin1" else utf8_ct_spec()
    return spec, tuple(to_bytes(ds) for ds in identifying_datasets(spec))


def _texts(ds: Dataset) -> list[tuple[str, str]]:
    """(where, casefolded text) of every element value at every depth, file meta included."""
    out = []
    for elem in [*ds.file_meta, *ds.iterall()]:
        if elem.VR == "SQ":
            continue
        value = elem.value
        if isinstance(value, bytes):
            text = value.decode("latin-1") + "\n" + value.decode("utf-8", "ignore")
        elif isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            text = "\\".join(map(str, value))
        else:
            text = str(value)
        out.append((f"{elem.tag} {elem.keyword}", text.casefold()))
    return out


def find_leaks(data: bytes, identifiers: list[str]) -> list[str]:
    """Where any of `identifiers` survives: element values (any depth, file meta) or raw bytes
    read as latin-1, utf-8 and utf-16-le (both alignments), case-insensitively."""
    ds = dcmread(io.BytesIO(data))
    texts = _texts(ds)
    raw = {
        "latin-1": data.decode("latin-1"),
        "utf-8": data.decode("utf-8", "ignore"),
        "utf-16-le": data.decode("utf-16-le", "ignore"),
        "utf-16-le+1": data[1:].decode("utf-16-le", "ignore"),
    }
    raw = {k: v.casefold() for k, v in raw.items()}
    found = []
    for ident in identifiers:
        needle = ident.casefold()
        found += [f"{ident!r} in {where}: {text[:120]!r}" for where, text in texts
                  if needle in text]
        found += [f"{ident!r} in raw output bytes ({enc})" for enc, text in raw.items()
                  if needle in text]
    return found


def _run(ds: Dataset, options: PseudonymizationOptions | None = None,
         pseudonym: str | None = None, secret: str = SECRET) -> DicomInstance:
    return Pseudonymizer(secret, options).pseudonymize(to_instance(ds), pseudonym)


OPTION_COMBINATIONS = [
    PseudonymizationOptions(dates=dates, clean_descriptors=clean,
                            retain_patient_characteristics=chars,
                            retain_device_identity=device)
    for dates, clean, chars, device in itertools.product(
        ("shift", "keep", "remove"), (True, False), (False, True), (False, True))
]


def _options_id(o: PseudonymizationOptions) -> str:
    return (f"dates={o.dates}-clean={int(o.clean_descriptors)}"
            f"-chars={int(o.retain_patient_characteristics)}"
            f"-device={int(o.retain_device_identity)}")


# --- 1. leaks -------------------------------------------------------------------------------


@pytest.mark.parametrize("charset", ["latin1", "utf8"])
@pytest.mark.parametrize("options", OPTION_COMBINATIONS, ids=_options_id)
def test_ct_instance_full_of_identifiers_leaks_nothing(charset, options):
    spec, instances = _study(charset)
    original = dcmread(io.BytesIO(instances[0]))
    assert original.SpecificCharacterSet == ("ISO_IR 100" if charset == "latin1"
                                             else "ISO_IR 192")
    identifiers = identifiers_of(spec, original, device=not options.retain_device_identity)
    out = Pseudonymizer(SECRET, options).pseudonymize(DicomInstance.from_bytes(instances[0]))
    leaks = find_leaks(out.data, identifiers)
    assert not leaks, "\n".join(leaks)


@pytest.mark.parametrize("charset", ["latin1", "utf8"])
def test_leak_detector_sees_every_identifier_in_the_original_instance(charset):
    """Guards the leak tests against passing vacuously."""
    spec, instances = _study(charset)
    original = dcmread(io.BytesIO(instances[0]))
    identifiers = identifiers_of(spec, original)
    for ident in identifiers:
        assert find_leaks(instances[0], [ident]), ident
    raw = {enc: any(ident.encode(enc, "ignore") in instances[0] for ident in identifiers)
           for enc in ("latin-1", "utf-8")}
    assert raw["latin-1" if charset == "latin1" else "utf-8"]


def test_ct_instance_keeps_harmless_descriptors_under_clean_descriptors():
    spec, instances = _study("latin1")
    out = Pseudonymizer(SECRET).pseudonymize(DicomInstance.from_bytes(instances[0])).dataset
    # "CT Thorax Größmann": the name goes, the description stays
    assert out.StudyDescription == "CT Thorax"
    assert out.SeriesDescription == spec.series[0].description
    basic = Pseudonymizer(SECRET, PseudonymizationOptions(clean_descriptors=False))
    out = basic.pseudonymize(DicomInstance.from_bytes(instances[0])).dataset
    assert "StudyDescription" not in out and "ImageComments" not in out


def test_structured_report_text_naming_the_patient_three_levels_deep_is_not_sent():
    ds = minimal_dataset("Größmann^Jörg Günther", "SR0815")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.PatientBirthDate = "19621107"
    ds.ValueType = "CONTAINER"
    text = item(RelationshipType="CONTAINS", ValueType="TEXT",
                TextValue="Befund für Jörg Größmann, geb. 07.11.1962: kein Anhalt für Malignität",
                ConceptNameCodeSequence=[item(CodeValue="121071", CodingSchemeDesignator="DCM",
                                              CodeMeaning="Finding")])
    section = item(RelationshipType="CONTAINS", ValueType="CONTAINER",
                   ContinuityOfContent="SEPARATE", ContentSequence=[text])
    ds.ContentSequence = [section]
    for clean in (True, False):
        out = _run(ds, PseudonymizationOptions(clean_descriptors=clean))
        leaks = find_leaks(out.data, ["Größmann", "Jörg", "07.11.1962"])
        assert not leaks, f"clean_descriptors={clean}:\n" + "\n".join(leaks)


def test_operator_identification_code_meaning_naming_the_operator_is_not_sent():
    ds = minimal_dataset()
    ds.OperatorsName = list(OPERATORS)  # Krüger^Lena, Nowak^Piotr
    person = item(CodeValue="EMP4711", CodingSchemeDesignator="L", CodeMeaning="Krüger, Lena")
    ds.OperatorIdentificationSequence = [item(PersonIdentificationCodeSequence=[person],
                                              InstitutionName="Uniklinik Heidelberg")]
    leaks = find_leaks(_run(ds).data, ["Krüger", "Lena", "Heidelberg"])
    assert not leaks, "\n".join(leaks)


def test_presentation_state_text_annotation_naming_the_patient_is_not_sent():
    ds = minimal_dataset("Größmann^Jörg")
    ds.GraphicAnnotationSequence = [item(
        GraphicLayer="LAYER1",
        TextObjectSequence=[item(UnformattedTextValue="Größmann, Jörg - Zustand nach OP",
                                 AnchorPointAnnotationUnits="PIXEL")])]
    leaks = find_leaks(_run(ds).data, ["Größmann", "Jörg"])
    assert not leaks, "\n".join(leaks)


def test_person_names_in_attributes_the_table_does_not_list_are_not_sent():
    ds = minimal_dataset()
    ds.EvaluatorName = "Schäfer^Jürgen"  # (0014,2006) PN
    ds.SecondaryReviewerName = "Weiß^Ingrid"  # (0014,0104) PN
    leaks = find_leaks(_run(ds).data, ["Schäfer", "Jürgen", "Weiß", "Ingrid"])
    assert not leaks, "\n".join(leaks)


def test_uppercase_eszett_spelling_of_the_name_in_a_comment_is_removed():
    ds = minimal_dataset("Größmann^Jörg")
    ds.ImageComments = "Patient GRÖSSMANN, JÖRG, Thorax"
    out = _run(ds).dataset
    assert "grössmann" not in str(out.get("ImageComments", "")).casefold()


def test_comment_where_removing_the_name_joins_it_again_is_clean():
    ds = minimal_dataset("Größmann^Jörg")
    ds.ImageComments = "Notiz GröGrößmannßmann Thorax"
    out = _run(ds).dataset
    assert "Größmann".casefold() not in str(out.get("ImageComments", "")).casefold()


def test_part_of_a_double_barrelled_surname_in_a_comment_is_removed():
    ds = minimal_dataset("Müller-Lüdenscheidt^Anna")
    ds.PatientComments = "Frau Lüdenscheidt kam in Begleitung"
    leaks = find_leaks(_run(ds).data, ["Lüdenscheidt", "Müller"])
    assert not leaks, "\n".join(leaks)


def test_real_study_date_written_in_a_comment_does_not_survive_date_shifting():
    ds = minimal_dataset()
    ds.StudyDate = ds.ContentDate = "20240315"
    ds.ImageComments = "Aufnahme vom 15.03.2024 (2024-03-15)"
    leaks = find_leaks(_run(ds).data, ["20240315", "15.03.2024", "2024-03-15"])
    assert not leaks, "\n".join(leaks)


def test_calibration_date_is_removed_when_dates_are_removed_even_with_device_identity():
    ds = minimal_dataset()
    ds.StudyDate = "20240315"
    ds.DateOfLastCalibration = "20231224"
    ds.DateOfManufacture = "20190101"
    options = PseudonymizationOptions(dates="remove", retain_device_identity=True)
    out = _run(ds, options).dataset
    kept = [f"{e.keyword}={e.value}" for e in out.iterall()
            if e.VR in ("DA", "DT") and e.value and not str(e.value).startswith("1900")]
    assert not kept, f"dates='remove' but real dates left: {kept}"


def test_name_with_only_latin1_umlauts_written_as_utf8_dataset_leaks_nothing():
    ds = minimal_dataset("Öztürk^Selin Ümran", "TR445566", charset="ISO_IR 192")
    ds.PatientBirthDate = "19801231"
    ds.PatientComments = "Selin Öztürk, 31.12.1980, TR445566"
    ds.StudyDescription = "MRT Kopf Öztürk"
    leaks = find_leaks(_run(ds).data, ["Öztürk", "Selin", "Ümran", "TR445566", "31.12.1980"])
    assert not leaks, "\n".join(leaks)


# --- 2. table coverage ----------------------------------------------------------------------

_SENT_TEXT = "SENT Johnathan"
_TEXT_VRS_CLEANED_WHEN_KEPT = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE"}
_SENT_UID = "1.2.826.0.1.3680043.8.498.4242"


def _sentinel(vr: str) -> object:
    if vr == "SQ":
        return [item(PatientName="Sentinel^Johnathan")]
    return {
        "PN": "Sentinel^Johnathan", "LO": _SENT_TEXT, "SH": _SENT_TEXT, "LT": _SENT_TEXT,
        "ST": _SENT_TEXT, "UT": _SENT_TEXT, "UC": _SENT_TEXT, "CS": "SENTINEL",
        "AE": "SENTINEL", "UR": "http://sentinel.example/Johnathan", "UI": _SENT_UID,
        "DA": "20200102", "DT": "20200102030405", "TM": "030405", "AS": "042Y", "DS": "42.5",
        "IS": "42", "US": 42, "SS": 42, "UL": 42, "SL": 42, "UV": 42, "SV": 42, "FL": 42.0,
        "FD": 42.0, "AT": 0x00100010, "OB": b"\x01\x02\x03\x04", "OW": b"\x01\x02\x03\x04",
        "OF": b"\x01\x02\x03\x04", "OD": b"\x01" * 8, "OL": b"\x01\x02\x03\x04",
        "OV": b"\x01" * 8, "UN": b"\x01\x02\x03\x04",
    }.get(vr)


def _expected_actions(row: dict[str, str], o: PseudonymizationOptions, vr: str) -> set[str]:
    """The action the module docstring promises for a table row under options `o`."""
    if vr in ("DA", "DT") and o.dates != "keep":
        # "Only the date options decide about dates" (retained device identity does not).
        o = dataclasses.replace(o, clean_descriptors=False, retain_device_identity=False,
                                retain_patient_characteristics=False)
    # A UID the table keeps under an active option (device UIDs) stays; others are replaced.
    return _table_actions(row, o)


def _table_actions(row: dict[str, str], o: PseudonymizationOptions) -> set[str]:
    columns = []
    if o.clean_descriptors:
        columns.append("clean_desc_opt")
    if o.dates == "keep":
        columns.append("rtn_long_full_dates_opt")
    elif o.dates == "shift":
        columns.append("rtn_long_modif_dates_opt")
    if o.retain_patient_characteristics:
        columns.append("rtn_pat_chars_opt")
    if o.retain_device_identity:
        columns.append("rtn_dev_id_opt")
    acts = {row[c] for c in columns if row[c]}
    if "C" in acts:  # "the cleaner action wins"
        return {"C"}
    if "K" in acts:
        return {"K"}
    choices = row["basic_profile_action"].replace("*", "").split("/")
    if len(choices) == 1:
        return set(choices)
    if "D" in choices:  # "D where D is allowed, else Z"
        return {"D"}
    if "U" in choices:  # X/Z/U*: a UID sequence; Z per the docstring, U per the UID rule
        return {"U", "Z"}
    return {"Z"} if "Z" in choices else {choices[0]}


def _is_empty(elem) -> bool:
    v = elem.value
    return v is None or v == "" or v == b"" or (elem.VR == "SQ" and len(v) == 0) or v == []


def _check(action: str, vr: str, sentinel: object, elem, p: Pseudonymizer,
           o: PseudonymizationOptions, pid: str) -> str | None:
    """None if `elem` (None when absent) is what `action` promises, else what is wrong."""
    if action == "X":
        return None if elem is None else f"present: {elem.value!r}"
    if elem is None:
        return "absent"
    value = elem.value
    if action == "Z":
        return None if _is_empty(elem) else f"not empty: {value!r}"
    if vr == "SQ":
        if action == "K" and len(value) != len(sentinel):  # type: ignore[arg-type]
            return f"items changed: {len(value)}"
        names = [str(i.get("PatientName", "")) for i in value]
        return f"item PatientName kept: {names}" if any("Johnathan" in n for n in names) \
            else None
    if action == "U":
        if vr != "UI":
            return f"U on VR {vr}: {value!r}"
        ok = value != sentinel and UID(str(value)).is_valid
        return None if ok else f"not a new valid UID: {value!r}"
    if action == "D":
        if vr == "UI":
            return None if value != sentinel and UID(str(value)).is_valid else f"{value!r}"
        return None if value != sentinel and value not in (None, "", b"") else f"{value!r}"
    if action == "K":
        if vr in _TEXT_VRS_CLEANED_WHEN_KEPT:
            # Kept text is cleaned of the instance's identifying values (deliberate: an option
            # keeps the attribute, not the patient's name in it); the sentinel carries the
            # patient's given name, exactly the rest stays.
            expected = str(sentinel).replace("Johnathan", "").strip(" ,;:^")
            return None if str(value) == expected else f"not {expected!r}: {value!r}"
        return None if value == sentinel else f"changed: {value!r}"
    # C
    if vr in ("DA", "DT"):
        if o.dates != "shift":
            return None if value == sentinel else f"changed: {value!r}"
        day = dt.date(2020, 1, 2) - dt.timedelta(days=p.date_offset(pid))
        expected = day.strftime("%Y%m%d") + ("030405" if vr == "DT" else "")
        return None if value == expected else f"not shifted to {expected}: {value!r}"
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "PN"):
        text = str(value or "")
        return f"not cleaned: {text!r}" if "johnathan" in text.casefold() else None
    return None if value == sentinel else f"changed: {value!r}"


TABLE_OPTIONS = {
    "default": PseudonymizationOptions(),
    "all-basic": PseudonymizationOptions(dates="remove", clean_descriptors=False),
    "all-retained": PseudonymizationOptions(dates="keep", retain_patient_characteristics=True,
                                            retain_device_identity=True),
}


@pytest.mark.parametrize("config", list(TABLE_OPTIONS))
def test_every_dictionary_attribute_of_the_ps315_table_gets_its_action(config):
    options = TABLE_OPTIONS[config]
    p = Pseudonymizer(SECRET, options)
    pid = "PID12345"
    rows = list(csv.DictReader(io.StringIO(TABLE_CSV.read_text("utf-8"))))
    assert len(profile_table()[0]) > 600
    mismatches, checked, skipped = [], 0, []
    for row in rows:
        raw = row["tag"].strip('()"').replace(",", "")
        if not all(c in "0123456789ABCDEFabcdef" for c in raw):
            continue
        tag = Tag(int(raw, 16))
        if not dictionary_has_tag(tag):
            continue
        vr = dictionary_VR(tag).split(" or ")[0]
        sentinel = _sentinel(vr)
        if sentinel is None:
            skipped.append(f"{row['tag']} {vr}")
            continue
        ds = minimal_dataset("Doe^Johnathan", pid)
        if tag.group == 0x0002:
            ds.file_meta.add_new(tag, vr, copy.deepcopy(sentinel))
        else:
            ds.add_new(tag, vr, copy.deepcopy(sentinel))
        p.pseudonymize_dataset(ds)
        elem = (ds.file_meta if tag.group == 0x0002 else ds).get(tag)
        actions = _expected_actions(row, options, vr)
        if tag in (Tag("PatientName"), Tag("PatientID")):
            source = _SENT_TEXT if tag == Tag("PatientID") else pid
            ok = str(elem.value) == p.pseudonym_for(source)
            problems = None if ok else f"not the pseudonym: {elem.value!r}"
        elif tag == Tag("MediaStorageSOPInstanceUID"):
            problems = None if elem.value == ds.SOPInstanceUID != _SENT_UID else "not new"
        else:
            results = {a: _check(a, vr, sentinel, elem, p, options, pid) for a in actions}
            problems = None if None in results.values() else "; ".join(
                f"{a}: {r}" for a, r in results.items())
        checked += 1
        if problems:
            mismatches.append(f"{row['tag']} {row['keyword']} ({vr}) "
                              f"table={row['basic_profile_action']} "
                              f"expected={'/'.join(sorted(actions))}: {problems}")
    assert checked >= 600, (checked, skipped)
    assert not mismatches, (f"{len(mismatches)} of {checked} rows checked ({config}) differ "
                            "from the table:\n" + "\n".join(mismatches))


# --- 3. UIDs --------------------------------------------------------------------------------


def _study_with_derived_image() -> tuple[list[Dataset], Dataset]:
    spec = small_ct_spec(instances=3)
    originals = list(identifying_datasets(spec))
    derived = copy.deepcopy(originals[1])
    derived.SOPInstanceUID = derived.file_meta.MediaStorageSOPInstanceUID = (
        uid_for(originals[1].SOPInstanceUID, "derived"))
    derived.SeriesInstanceUID = uid_for(originals[1].SeriesInstanceUID, "derived")
    derived.ImageType = ["DERIVED", "SECONDARY"]
    derived.ReferencedImageSequence = [item(ReferencedSOPClassUID=CT_SOP_CLASS,
                                            ReferencedSOPInstanceUID=originals[0].SOPInstanceUID)]
    derived.SourceImageSequence = [item(ReferencedSOPClassUID=CT_SOP_CLASS,
                                        ReferencedSOPInstanceUID=originals[2].SOPInstanceUID)]
    derived.ReferencedSeriesSequence = [item(SeriesInstanceUID=originals[0].SeriesInstanceUID)]
    return originals, derived


def _all_uids(ds: Dataset) -> list[tuple[str, str]]:
    found = []
    for elem in [*ds.file_meta, *ds.iterall()]:
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            found += [(elem.keyword, str(v)) for v in values]
    return found


def test_one_study_with_a_derived_image_keeps_every_reference_valid():
    originals, derived = _study_with_derived_image()
    p = Pseudonymizer(SECRET)
    outs = [p.pseudonymize(to_instance(ds)) for ds in [*originals, derived]]
    images = [o.dataset for o in outs]
    new_derived = images[-1]

    assert len({d.StudyInstanceUID for d in images}) == 1
    assert images[0].StudyInstanceUID != originals[0].StudyInstanceUID
    assert len({d.SeriesInstanceUID for d in images[:3]}) == 1
    assert len({d.FrameOfReferenceUID for d in images}) == 1
    assert images[0].FrameOfReferenceUID != originals[0].FrameOfReferenceUID
    assert len({d.SOPInstanceUID for d in images}) == 4
    ref = new_derived.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == images[0].SOPInstanceUID
    assert ref.ReferencedSOPClassUID == CT_SOP_CLASS
    assert new_derived.SourceImageSequence[0].ReferencedSOPInstanceUID == \
        images[2].SOPInstanceUID
    assert new_derived.ReferencedSeriesSequence[0].SeriesInstanceUID == \
        images[0].SeriesInstanceUID
    assert originals[0].ReferencedStudySequence[0].ReferencedSOPClassUID == STUDY_REF_SOP_CLASS
    assert len(images[0].ReferencedStudySequence) == 0  # (0008,1110) X/Z: Z

    original_uids = {v for ds in [*originals, derived] for k, v in _all_uids(ds)
                     if not v.startswith("1.2.840.10008.") and k != "ImplementationClassUID"}
    for out, new in zip(outs, images, strict=True):
        assert new.SOPClassUID == CT_SOP_CLASS
        assert new.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        assert new.file_meta.MediaStorageSOPClassUID == new.SOPClassUID
        assert out.sop_instance_uid == new.SOPInstanceUID
        assert out.study_uid == new.StudyInstanceUID
        invalid = [(k, v) for k, v in _all_uids(new) if not UID(v).is_valid]
        assert not invalid
        text = out.data.decode("latin-1")
        survived = [u for u in original_uids if u in text]
        assert not survived, f"original UIDs survived: {survived}"


def test_same_secret_gives_the_same_uids_in_two_pseudonymizers_and_another_secret_does_not():
    originals, _ = _study_with_derived_image()
    first = [Pseudonymizer(SECRET).pseudonymize(to_instance(ds)) for ds in originals]
    second = [Pseudonymizer(SECRET.encode()).pseudonymize(to_instance(ds)) for ds in originals]
    other = [Pseudonymizer("another secret").pseudonymize(to_instance(ds)) for ds in originals]
    assert [o.data for o in first] == [o.data for o in second]
    for a, b in zip(first, other, strict=True):
        ua, ub = dict(_all_uids(a.dataset)), dict(_all_uids(b.dataset))
        for key in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "FrameOfReferenceUID"):
            assert ua[key] != ub[key]
        assert ua["SOPClassUID"] == ub["SOPClassUID"] == CT_SOP_CLASS
        assert a.dataset.PatientID != b.dataset.PatientID


# --- 4. pixels ------------------------------------------------------------------------------


def test_synthetic_ct_pixels_are_bit_identical():
    _, instances = _study("latin1")
    p = Pseudonymizer(SECRET)
    for data in instances:
        before = dcmread(io.BytesIO(data))
        out = p.pseudonymize(DicomInstance.from_bytes(data))
        after = out.dataset
        assert after.PixelData == before.PixelData
        assert after["PixelData"].VR == before["PixelData"].VR
        assert out.transfer_syntax_uid == ExplicitVRLittleEndian
        for key in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                    "RescaleIntercept", "RescaleSlope", "PhotometricInterpretation"):
            assert after[key].value == before[key].value


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "MR_small_jp2klossless.dcm"])
def test_compressed_sample_pixels_and_transfer_syntax_are_unchanged(name):
    data = Path(get_testdata_file(name)).read_bytes()
    before = dcmread(io.BytesIO(data))
    out = Pseudonymizer(SECRET).pseudonymize(DicomInstance.from_bytes(data))
    after = out.dataset
    assert out.transfer_syntax_uid == before.file_meta.TransferSyntaxUID
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.PixelData == before.PixelData
    assert after.get("NumberOfFrames") == before.get("NumberOfFrames")
    assert after.PatientName != before.PatientName
    assert after.SOPInstanceUID != before.SOPInstanceUID


# --- 5. pseudonym, dates, declaration, burned-in, private -----------------------------------


def test_given_pseudonym_names_the_patient_and_the_trial_subject():
    _, instances = _study("latin1")
    options = PseudonymizationOptions(trial_protocol_id="ADIT-TRIAL-7",
                                      trial_protocol_name="Lung screening")
    out = Pseudonymizer(SECRET, options).pseudonymize(
        DicomInstance.from_bytes(instances[0]), pseudonym="SUBJ-0042").dataset
    assert out.PatientID == "SUBJ-0042"
    assert str(out.PatientName) == "SUBJ-0042"
    assert out.ClinicalTrialSubjectID == "SUBJ-0042"
    assert out.ClinicalTrialProtocolID == "ADIT-TRIAL-7"
    assert out.ClinicalTrialProtocolName == "Lung screening"
    plain = Pseudonymizer(SECRET).pseudonymize(DicomInstance.from_bytes(instances[0]),
                                               pseudonym="SUBJ-0042").dataset
    assert "ClinicalTrialSubjectID" not in plain


def test_derived_pseudonym_is_stable_for_one_patient_id_and_differs_between_patients():
    _, instances = _study("latin1")
    p = Pseudonymizer(SECRET)
    outs = [p.pseudonymize(DicomInstance.from_bytes(d)).dataset for d in instances]
    assert {o.PatientID for o in outs} == {p.pseudonym_for("CTBENCH0000")}
    assert {str(o.PatientName) for o in outs} == {p.pseudonym_for("CTBENCH0000")}
    assert Pseudonymizer(SECRET).pseudonym_for("CTBENCH0000") == outs[0].PatientID
    assert p.pseudonym_for("CTBENCH0001") != outs[0].PatientID
    assert Pseudonymizer("other").pseudonym_for("CTBENCH0000") != outs[0].PatientID
    assert "CTBENCH" not in outs[0].PatientID


def _two_studies_of_one_patient() -> list[Dataset]:
    spec = small_ct_spec(instances=1)
    later = StudySpec(**{**spec.__dict__, "accession": "ACCCT000777", "study_date": "20250102",
                         "study_time": "080000"})
    return [next(identifying_datasets(spec)), next(identifying_datasets(later))]


def _date(value: str) -> dt.date:
    return dt.datetime.strptime(str(value), "%Y%m%d").date()


def test_one_patient_two_studies_share_pseudonym_and_date_offset():
    first, second = _two_studies_of_one_patient()
    p = Pseudonymizer(SECRET)
    a, b = (p.pseudonymize(to_instance(ds)).dataset for ds in (first, second))
    assert a.PatientID == b.PatientID
    assert a.StudyInstanceUID != b.StudyInstanceUID
    offset = p.date_offset("CTBENCH0000")
    assert 1 <= offset <= 730
    for before, after in ((first, a), (second, b)):
        for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            assert (_date(before[key].value) - _date(after[key].value)).days == offset, key
        assert after.StudyTime == before.StudyTime
        assert not after.get("PatientBirthDate")
    interval = _date(second.StudyDate) - _date(first.StudyDate)
    assert _date(b.StudyDate) - _date(a.StudyDate) == interval


def test_two_patients_get_independent_date_offsets_that_stay_put_across_runs():
    offsets = {Pseudonymizer(SECRET).date_offset(f"PAT{i:04d}") for i in range(40)}
    assert len(offsets) > 20 and all(1 <= o <= 730 for o in offsets)
    assert Pseudonymizer(SECRET).date_offset("X1") == Pseudonymizer(SECRET).date_offset("X1")


def test_dates_are_kept_with_keep():
    first, _ = _two_studies_of_one_patient()
    out = _run(first, PseudonymizationOptions(dates="keep")).dataset
    for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        assert out[key].value == first[key].value
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_dates_are_removed_with_remove():
    first, _ = _two_studies_of_one_patient()
    out = _run(first, PseudonymizationOptions(dates="remove")).dataset
    real = [f"{e.keyword}={e.value}" for e in out.iterall() if e.VR in ("DA", "DT") and
            e.value and not str(e.value).startswith("1900")]
    assert not real
    assert first.StudyDate == "20240315"
    assert not find_leaks(to_bytes(out), ["20240315"])
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


CODE_CASES = [
    (PseudonymizationOptions(), {"113100", "113105", "113107"}, "MODIFIED"),
    (PseudonymizationOptions(dates="keep", clean_descriptors=False), {"113100", "113106"},
     "UNMODIFIED"),
    (PseudonymizationOptions(dates="remove", clean_descriptors=False), {"113100"}, "REMOVED"),
    (PseudonymizationOptions(retain_patient_characteristics=True, retain_device_identity=True,
                             dates="remove"),
     {"113100", "113105", "113108", "113109"}, "REMOVED"),
    (PseudonymizationOptions(safe_private_creators=frozenset({"ACME SAFE"}), dates="keep"),
     {"113100", "113105", "113106", "113111"}, "UNMODIFIED"),
]


@pytest.mark.parametrize(("options", "codes", "temporal"), CODE_CASES)
def test_deidentification_declaration_lists_exactly_the_options_used(options, codes, temporal):
    ds = minimal_dataset()
    ds.StudyDate = "20240315"
    ds.DeidentificationMethodCodeSequence = [item(CodeValue="999999",
                                                  CodingSchemeDesignator="L",
                                                  CodeMeaning="stale")]
    out = _run(ds, options).dataset
    got = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert sorted(got) == sorted(codes)
    assert {i.CodingSchemeDesignator for i in out.DeidentificationMethodCodeSequence} == {"DCM"}
    assert all(i.CodeMeaning for i in out.DeidentificationMethodCodeSequence)
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == temporal


def test_image_flagged_with_burned_in_annotation_is_refused_unless_allowed():
    ds = minimal_dataset()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(BurnedInAnnotation):
        _run(ds)
    out = _run(ds, PseudonymizationOptions(allow_burned_in=True)).dataset
    assert out.PatientIdentityRemoved == "YES"
    ds.BurnedInAnnotation = "NO"
    assert _run(ds).dataset.BurnedInAnnotation == "NO"


def _private_dataset() -> Dataset:
    ds = minimal_dataset("Größmann^Jörg", "PRIV001")
    ds.private_block(0x0009, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", "Größmann^Jörg")
    ds.private_block(0x0011, "ACME SAFE", create=True).add_new(0x01, "DS", "1.5")
    nested = item(CodeValue="1", CodingSchemeDesignator="L", CodeMeaning="x")
    nested.private_block(0x0013, "ACME SAFE", create=True).add_new(0x02, "SH", "kernel B30")
    nested.private_block(0x0015, DEEP_PRIVATE_CREATOR, create=True).add_new(0x03, "LO",
                                                                            "PRIV001")
    ds.ScheduledProtocolCodeSequence = [nested]
    return ds


def test_private_tags_at_any_depth_are_removed_by_default():
    out = _run(_private_dataset())
    private = [str(e.tag) for e in out.dataset.iterall() if e.tag.is_private]
    assert not private
    assert not find_leaks(out.data, ["Größmann", "PRIV001", "ACME SAFE", PRIVATE_CREATOR])


def test_private_block_of_a_safe_creator_is_kept_at_any_depth_and_others_go():
    options = PseudonymizationOptions(safe_private_creators=frozenset({"ACME SAFE"}))
    out = _run(_private_dataset(), options).dataset
    assert out.private_block(0x0011, "ACME SAFE")[0x01].value == "1.5"
    nested = out.ScheduledProtocolCodeSequence[0]
    assert nested.private_block(0x0013, "ACME SAFE")[0x02].value == "kernel B30"
    private = {e.tag.group for e in out.iterall() if e.tag.is_private}
    assert private == {0x0011, 0x0013}
    assert "113111" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]


# --- 6. property-based ----------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöüÄÖÜß0123456789"


@st.composite
def _identifier(draw) -> str:
    """4-20 letters (umlauts included) and digits; at least one umlaut, so that no fixed text
    of the output (code meanings, hashes, pseudonyms) can contain it by chance."""
    left = draw(st.text(alphabet=_LETTERS, max_size=9))
    right = draw(st.text(alphabet=_LETTERS, max_size=10))
    umlaut = draw(st.sampled_from("äöüÄÖÜ"))
    text = (left + umlaut + right).ljust(4, "0")
    return text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=_identifier(), given_name=_identifier(), patient_id=_identifier(),
       clean=st.booleans())
def test_random_identifiers_in_names_ids_comments_and_private_tags_never_leave(
        family, given_name, patient_id, clean):
    ds = minimal_dataset(f"{family}^{given_name}", patient_id)
    ds.PatientComments = f"Patient {given_name} {family}, ID {patient_id}"
    ds.ImageComments = f"{family}/{patient_id}"
    ds.StudyDescription = f"CT {family}"
    ds.AccessionNumber = "A1"
    ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", f"{family} {patient_id}")
    deep = item(PatientName=f"{family}^{given_name}", PatientID=patient_id)
    ds.ScheduledProtocolCodeSequence = [item(ProtocolContextSequence=[deep])]
    out = _run(ds, PseudonymizationOptions(clean_descriptors=clean))
    leaks = find_leaks(out.data, [family, given_name, patient_id])
    assert not leaks, "\n".join(leaks)


def test_pydicom_version_is_the_one_these_tests_were_written_against():
    assert int(pydicom.__version__.split(".")[0]) >= 3
