"""The leak check every pseudonymized instance passes before it leaves (`verify.py`): it
catches what a faulty pseudonymizer would let through, names the attribute and never the
value, does not hold against ADIT what ADIT writes itself, and stays cheap."""

from __future__ import annotations

import datetime as dt
import io
import warnings
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file, get_testdata_files

from adit_tasks.core import pseudonymize as pseudonymize_module
from adit_tasks.core import verify as verify_module
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.pseudonymize import (
    LeakFound,
    PseudonymizationOptions,
    Pseudonymizer,
)
from adit_tasks.core.verify import Evidence, verify
from tests.dicom_builders import (
    encoded,
    identifying_datasets,
    item,
    minimal_dataset,
    small_ct_spec,
    to_bytes,
    to_instance,
)

SECRET = "test-secret-of-the-project"
NAME = "Größmann^Jörg"


def _source() -> Dataset:
    ds = minimal_dataset(NAME, "PID12345")
    ds.PatientBirthDate = "19621107"
    ds.StudyDate = "20240318"
    ds.OperatorsName = "Wu^Li"
    ds.ImageComments = "Kontrolle"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\1\2\3\4"
    return ds


def _pseudonymized(ds: Dataset | None = None, **kwargs) -> tuple[bytes, Evidence, Dataset]:
    """Good output, its evidence, and the original."""
    ds = ds or _source()
    out, evidence, _ = Pseudonymizer(SECRET).pseudonymize_unverified(to_instance(ds), **kwargs)
    return out.data, evidence, ds


def _tampered(data: bytes, change) -> bytes:
    """The output changed as a faulty pseudonymizer would have left it, re-encoded."""
    ds = dcmread(io.BytesIO(data))
    change(ds)
    ds.preamble = b"\0" * 128
    return to_bytes(ds)


def _leak(data: bytes, evidence: Evidence) -> LeakFound:
    with pytest.raises(LeakFound) as caught:
        verify(data, evidence)
    return caught.value


# --- clean output passes, cheaply ---------------------------------------------------------


@pytest.mark.parametrize("options", [
    PseudonymizationOptions(),
    PseudonymizationOptions(dates="keep", clean_descriptors=False),
    PseudonymizationOptions(dates="remove", retain_device_identity=True,
                            retain_patient_characteristics=True),
], ids=["default", "keep-dates-no-clean", "remove-dates-retain"])
def test_a_study_full_of_identifiers_passes_the_check_without_parsing(options, monkeypatch):
    """The fast check alone decides for an ordinary instance: no element-by-element parse."""
    parsed = []
    monkeypatch.setattr(verify_module, "_check_elements", lambda *a: parsed.append(a))
    p = Pseudonymizer(SECRET, options)
    for ds in identifying_datasets(small_ct_spec(instances=3)):
        p.pseudonymize(to_instance(ds))  # raises LeakFound if the check fails
    assert not parsed


def test_the_fast_check_parses_only_when_it_finds_a_candidate(monkeypatch):
    ds = _source()
    ds.OperatorsName = "Nowak^Piotr"
    data, evidence, _ = _pseudonymized(ds)
    calls = []
    real = verify_module._check_elements
    monkeypatch.setattr(verify_module, "_check_elements",
                        lambda *a: (calls.append(1), real(*a)))
    verify(data, evidence)
    assert not calls
    with pytest.raises(LeakFound):
        verify(_tampered(data, lambda ds: setattr(ds, "ImageComments", "Jörg")), evidence)
    assert calls == [1]


def test_a_two_letter_name_part_in_a_longer_word_is_no_leak():
    """'Li' is in 'Application' (the declaration): the fast check asks for a parse, the
    parse looks at words and lets the output pass."""
    data, evidence, _ = _pseudonymized()
    verify(data, evidence)
    verify(_tampered(data, lambda ds: setattr(ds, "ImageComments", "Lipid, Wurst")), evidence)


# --- what a faulty pseudonymizer leaves is caught, by attribute --------------------------------


@pytest.mark.parametrize(("attribute", "change"), [
    ("ImageComments", lambda ds: setattr(ds, "ImageComments", "Patient Jörg Größmann")),
    ("ImageComments", lambda ds: setattr(ds, "ImageComments", "GROESSMANN")),
    ("ImageComments", lambda ds: setattr(ds, "ImageComments", "Li Wu")),
    ("ImageComments", lambda ds: setattr(ds, "ImageComments", "geb. 7 Nov 1962")),
    ("ImageComments", lambda ds: setattr(ds, "ImageComments", "ID PID12345")),
    ("StationName", lambda ds: setattr(ds, "StationName", "PID12345")),
    ("SecondaryReviewDate", lambda ds: setattr(ds, "SecondaryReviewDate", "20240318")),
    ("ProcedureCodeSequence>ConceptCodeSequence>CodeMeaning", lambda ds: setattr(
        ds, "ProcedureCodeSequence", [item(CodeValue="1", CodingSchemeDesignator="L",
                                           CodeMeaning="x", ConceptCodeSequence=[item(
                                               CodeValue="2", CodingSchemeDesignator="L",
                                               CodeMeaning="Größmann")])])),
    ("(0029,1001)", lambda ds: ds.private_block(0x0029, "ACME", create=True).add_new(
        0x01, "LO", "Jörg")),
    ("ICCProfile", lambda ds: setattr(ds, "ICCProfile", b"\0\1Groessmann\0\2")),
    ("DataSetTrailingPadding", lambda ds: ds.add_new(0xFFFCFFFC, "OB", b"PID12345")),
])
def test_an_identifying_value_left_in_the_output_is_found_and_named(attribute, change):
    data, evidence, _ = _pseudonymized()
    verify(data, evidence)
    leak = _leak(_tampered(data, change), evidence)
    assert leak.attribute == attribute
    assert str(leak).startswith("identifying value in ")
    for value in ("Größmann", "Groessmann", "Jörg", "PID12345", "1962", "Li Wu"):
        assert value.casefold() not in str(leak).casefold()


def test_an_original_uid_left_in_a_uid_or_in_text_is_found():
    data, evidence, original = _pseudonymized()
    leak = _leak(_tampered(data, lambda ds: setattr(ds, "StudyInstanceUID",
                                                   original.StudyInstanceUID)), evidence)
    assert (leak.attribute, leak.what) == ("StudyInstanceUID", "original UID")
    leak = _leak(_tampered(data, lambda ds: setattr(
        ds, "ImageComments", f"prior {original.SOPInstanceUID}.")), evidence)
    assert (leak.attribute, leak.what) == ("ImageComments", "original UID")


def test_a_uid_of_another_instance_of_the_study_is_found():
    other = "1.2.826.0.1.3680043.8.498.4711.42"
    data, evidence, _ = _pseudonymized(study_uids=frozenset({other}))
    verify(data, evidence)
    leak = _leak(_tampered(data, lambda ds: setattr(ds, "ImageComments", f"see {other}")),
                 evidence)
    assert leak.what == "original UID"


def test_a_preamble_that_is_not_zero_is_found():
    data, evidence, _ = _pseudonymized()
    leak = _leak(b"Groessmann".ljust(128, b"\0") + data[128:], evidence)
    assert leak.attribute == "the file preamble"


@pytest.mark.parametrize("tag", [0x00120062, 0x00120064])
def test_an_output_without_the_declaration_is_not_sent(tag):
    data, evidence, _ = _pseudonymized()
    leak = _leak(_tampered(data, lambda ds: ds.__delitem__(tag)), evidence)
    assert leak.attribute in ("PatientIdentityRemoved", "DeidentificationMethodCodeSequence")


def test_identifying_bytes_inside_the_pixel_data_are_not_the_checks_business():
    ds = _source()
    ds.PixelData = "Jörg".encode("latin-1")  # what pixels show is issue 13's (burned-in)
    data, evidence, _ = _pseudonymized(ds)
    verify(data, evidence)


def test_an_element_sent_with_a_wrong_pixel_span_is_still_checked():
    data, evidence, _ = _pseudonymized()
    bad = _tampered(data, lambda ds: setattr(ds, "ImageComments", "Jörg"))
    with pytest.raises(LeakFound):
        verify(bad, evidence, pixel=(132, len(bad)))  # a span claimed over the header


# --- what ADIT writes itself is not held against it ---------------------------------------------


def test_a_patient_named_like_the_declaration_and_the_sponsor_passes():
    ds = _source()
    ds.PatientName = "Basic^Adit Profile"
    ds.OperatorsName = "Safe^Full"
    options = PseudonymizationOptions(trial_protocol_id="T-1", trial_sponsor="ADIT")
    Pseudonymizer(SECRET, options).pseudonymize(to_instance(ds))


def test_a_patient_named_anonymized_and_a_placeholder_birth_date_pass():
    ds = _source()
    ds.PatientName = "Anonymized"
    ds.InstitutionName = "Klinik"  # gets the dummy text
    ds.PatientBirthDate = "19000101"
    ds.ContentDate = "19000101"
    Pseudonymizer(SECRET, PseudonymizationOptions(dates="keep")).pseudonymize(to_instance(ds))


def test_a_pseudonym_chosen_equal_to_the_patient_id_passes():
    ds = _source()
    Pseudonymizer(SECRET).pseudonymize(to_instance(ds), pseudonym="PID12345")


def test_a_newborn_imaged_on_the_day_of_birth_with_dates_kept_passes():
    ds = _source()
    ds.StudyDate = ds.ContentDate = ds.PatientBirthDate
    options = PseudonymizationOptions(dates="keep")
    out = Pseudonymizer(SECRET, options).pseudonymize(to_instance(ds)).dataset
    assert out.StudyDate == "19621107"


def test_a_shifted_date_that_falls_on_another_original_date_passes():
    p = Pseudonymizer(SECRET)
    ds = _source()
    shifted = dt.date(2024, 3, 18) - dt.timedelta(days=p.date_offset("PID12345"))
    ds.DateOfLastCalibration = shifted.strftime("%Y%m%d")  # an original date, equal to
    p.pseudonymize(to_instance(ds))  # the StudyDate as written


# --- every sample pydicom ships, and the pseudonymizer's own check --------------------------


def _samples() -> list[Path]:
    accepted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*.dcm")):
            try:
                DicomInstance.from_bytes(Path(name).read_bytes())
            except Exception:
                continue
            accepted.append(Path(name))
    return accepted


def test_every_pydicom_sample_accepted_at_arrival_is_pseudonymized_and_passes():
    samples = _samples()
    assert len(samples) > 40
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in samples:
            instance = DicomInstance.from_bytes(path.read_bytes())
            for options in (PseudonymizationOptions(allow_burned_in=True),
                            PseudonymizationOptions(dates="keep", clean_descriptors=False,
                                                    allow_burned_in=True)):
                try:
                    Pseudonymizer(SECRET, options).pseudonymize(instance)
                except Exception as exc:
                    failed.append(f"{path.name}: {type(exc).__name__}: {exc}")
    assert not failed, "\n".join(failed)


def test_pseudonymize_withholds_what_the_cleaning_misses(monkeypatch):
    """The check is part of pseudonymize(): a cleaning that forgot the text is caught."""
    monkeypatch.setattr(pseudonymize_module, "scrub", lambda text, *a, **k: text)
    ds = _source()
    ds.ImageComments = "Jörg Größmann"
    with pytest.raises(LeakFound) as caught:
        Pseudonymizer(SECRET).pseudonymize(to_instance(ds))
    assert caught.value.attribute == "ImageComments"


def test_a_deflated_instance_is_checked_element_by_element():
    data = encoded(_source(), "1.2.840.10008.1.2.1.99")
    out = Pseudonymizer(SECRET).pseudonymize(DicomInstance.from_bytes(data))
    assert out.transfer_syntax_uid == "1.2.840.10008.1.2.1.99"
    assert dcmread(io.BytesIO(out.data)).PatientIdentityRemoved == "YES"


def test_a_big_endian_instance_is_pseudonymized_and_checked():
    data = Path(get_testdata_file("MR_small_bigendian.dcm")).read_bytes()
    out = Pseudonymizer(SECRET).pseudonymize(DicomInstance.from_bytes(data))
    assert out.transfer_syntax_uid == "1.2.840.10008.1.2.2"
    before, after = dcmread(io.BytesIO(data)), dcmread(io.BytesIO(out.data))
    assert after.PixelData == before.PixelData


def test_utf8_text_in_an_item_with_its_own_character_set_is_checked():
    data, evidence, _ = _pseudonymized()

    def change(ds):
        inner = item(CodeValue="1", CodingSchemeDesignator="L", CodeMeaning="Größmann")
        inner.SpecificCharacterSet = "ISO_IR 192"
        ds.ProcedureCodeSequence = [inner]
        del ds.SpecificCharacterSet

    leak = _leak(_tampered(data, change), evidence)
    assert leak.attribute == "ProcedureCodeSequence>CodeMeaning"
