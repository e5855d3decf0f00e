"""Data set builders for the pseudonymization tests: instances full of identifying values."""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import unicodedata
import warnings
from collections.abc import Iterator

from pydicom import Dataset, dcmwrite
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from adit_tasks.core.instances import DicomInstance
from adit_tasks.lab.synthetic import (
    INSTITUTION,
    OPERATORS,
    PERFORMING,
    READING,
    REFERRING,
    StudySpec,
    ct_study_spec,
    make_study,
)

CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
BIRTH_ISO = "1962-11-07"
BIRTH_GERMAN = "07.11.1962"
FILE_META_AE = "KLINIK_PACS_HD"
FILE_META_PRIVATE_CREATOR_UID = "1.2.826.0.1.3680043.8.498.777"
FILE_META_PRIVATE_INFO = b"Groessmann Joerg KV778899 "
OTHER_ID = "KV778899"
OTHER_ISSUER = "AOK Baden-Wuerttemberg"
DEEP_PRIVATE_CREATOR = "ACME DEEP"


def small_ct_spec(patient_name: str = "Größmann^Jörg Günther^^Dr.",
                  instances: int = 3) -> StudySpec:
    """The synthetic CT study, but 64x64 so that tests stay fast."""
    spec = ct_study_spec(instances=instances)
    series = tuple(dataclasses.replace(s, rows=64, columns=64, instances=instances)
                   for s in spec.series)
    return dataclasses.replace(spec, patient_name=patient_name, series=series)


def utf8_ct_spec() -> StudySpec:
    """A patient whose name needs ISO_IR 192 (ř, Š are not in Latin-1)."""
    return dataclasses.replace(small_ct_spec("Dvořák^Anežka Šárka^^Dr."),
                               patient_id="CZ77001234", accession="ACCUTF8001")


def readable(pn: str) -> str:
    family, given, *_ = [*pn.split("^"), "", ""]
    return f"{given} {family}"


def item(**kwargs: object) -> Dataset:
    ds = Dataset()
    for key, value in kwargs.items():
        setattr(ds, key, value)
    return ds


def add_identifying_extras(ds: Dataset, spec: StudySpec) -> None:
    """Put the patient's identifiers in every other place a real PACS puts them."""
    name = readable(spec.patient_name)
    ds.PatientComments = (f"{name} (geb. {BIRTH_ISO}, {BIRTH_GERMAN}), ID {spec.patient_id}, "
                          f"Fall {spec.accession}")
    ds.AdditionalPatientHistory = f"{name}, Vorbefund {spec.accession}, geb. {BIRTH_GERMAN}"
    ds.StudyDescription = f"CT Thorax {spec.patient_name.split('^')[0]}"
    ds.ImageComments = f"Bild von {name} am {spec.study_date}, {BIRTH_ISO}"
    ds.OtherPatientIDsSequence = [item(PatientID=OTHER_ID, IssuerOfPatientID=OTHER_ISSUER)]
    ds.RequestAttributesSequence[0].RequestedProcedureDescription = f"CT fuer {name}"
    # three levels deep, under sequences the profile does not name (so they are kept/recursed)
    level3 = item(PatientName=spec.patient_name, PatientID=spec.patient_id,
                  PatientBirthDate=spec.birth_date, ContentCreatorName=PERFORMING,
                  PatientComments=f"{name}, {BIRTH_GERMAN}", AccessionNumber=spec.accession)
    level3.private_block(0x0029, DEEP_PRIVATE_CREATOR, create=True).add_new(
        0x01, "LO", spec.patient_name)
    level2 = item(CodeValue="P1", CodingSchemeDesignator="99ADIT", CodeMeaning="Protocol",
                  ProtocolContextSequence=[level3])
    level2.private_block(0x0029, DEEP_PRIVATE_CREATOR, create=True).add_new(
        0x02, "LO", spec.patient_id)
    level1 = item(ScheduledProtocolCodeSequence=[level2],
                  ScheduledPerformingPhysicianName=REFERRING,
                  ScheduledProcedureStepDescription=f"CT {name}")
    ds.ScheduledProcedureStepSequence = [level1]
    # and the same three levels under a sequence the profile removes (RequestAttributes)
    ds.RequestAttributesSequence[0].ScheduledProtocolCodeSequence = [level2]


def add_file_meta_identifiers(ds: Dataset) -> None:
    ds.file_meta.SourceApplicationEntityTitle = FILE_META_AE
    ds.file_meta.PrivateInformationCreatorUID = FILE_META_PRIVATE_CREATOR_UID
    ds.file_meta.PrivateInformation = FILE_META_PRIVATE_INFO


def identifying_datasets(spec: StudySpec) -> Iterator[Dataset]:
    for ds in make_study(spec):
        add_identifying_extras(ds, spec)
        add_file_meta_identifiers(ds)
        yield ds


def identifiers_of(spec: StudySpec, ds: Dataset, *, device: bool = True) -> list[str]:
    """The strings that must never leave: names and their parts, IDs, dates, places."""
    family, given = spec.patient_name.split("^")[:2]
    values = [spec.patient_name, family, *given.split(), spec.patient_id, spec.birth_date,
              BIRTH_ISO, BIRTH_GERMAN, spec.accession, ds.StudyID, OTHER_ID,
              "Wuerttemberg", FILE_META_AE, FILE_META_PRIVATE_CREATOR_UID, "Groessmann",
              INSTITUTION, "Universitätsklinikum", "Neuenheimer Feld", "69120"]
    for pn in (REFERRING, READING, PERFORMING, *OPERATORS):
        family, given = pn.split("^")[:2]
        values += [family, given]
    if device:
        values += [str(ds.StationName), str(ds.DeviceSerialNumber)]
    return values


def to_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def to_instance(ds: Dataset) -> DicomInstance:
    return DicomInstance.from_bytes(to_bytes(ds))


def minimal_dataset(patient_name: str = "Doe^Johnathan", patient_id: str = "PID12345",
                    charset: str = "ISO_IR 100") -> Dataset:
    """A small CT-like data set with file meta, no pixels."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.StudyInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = "CT"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds



# --- crafted encodings (values pydicom would refuse to convert, other syntaxes) ----------------


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put an element with exactly these value bytes (explicit VR little endian), bypassing
    pydicom's validation: a Patient ID in an IS attribute, text in a DS, a tag the
    dictionary does not know."""
    if len(value) % 2:
        value += b" "
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian, *,
            preamble: bytes | None = None, implicit_vr: bool | None = None) -> bytes:
    """Part 10 bytes of `ds` in another transfer syntax, with a preamble of our choosing;
    `implicit_vr`: encode the data set otherwise than the syntax says (as some archives do)."""
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    if preamble is not None:
        ds.preamble = preamble.ljust(128, b"\0")[:128]
    out = io.BytesIO()
    forced: dict[str, bool] = {"enforce_file_format": True}
    if implicit_vr is not None:
        ds.preamble = getattr(ds, "preamble", None) or b"\0" * 128
        forced = {"implicit_vr": implicit_vr, "little_endian": True, "force_encoding": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the builder's own warnings about crafted values
        dcmwrite(out, ds, **forced)
    return out.getvalue()


def fold(text: str) -> str:
    """Case and diacritics away (the tests' own, independent of the product's)."""
    text = unicodedata.normalize("NFKD", text.replace("ß", "ss").replace("ẞ", "ss"))
    return "".join(c for c in text if not unicodedata.combining(c)).casefold()


def marker_leaks(data: bytes, markers: list[str]) -> list[str]:
    """Which markers appear in the bytes (Latin-1 and UTF-8, any case, with or without
    diacritics): markers shorter than five characters as whole words only (the output
    spells 'Application', which holds 'li', and new UIDs have 39 digits), longer ones
    anywhere."""
    texts = [fold(data.decode("latin-1")), fold(data.decode("utf-8", "replace"))]
    found = []
    for marker in markers:
        needle = re.escape(fold(marker))
        pattern = needle if len(marker) >= 5 else rf"(?<![^\W_]){needle}(?![^\W_])"
        if any(re.search(pattern, t) for t in texts):
            found.append(marker)
    return found


def pseudonymized_bytes(ds_or_data: Dataset | bytes, options: object = None,
                        secret: str = "test-secret-of-the-project", **kwargs: object) -> bytes:
    """What the pseudonymizer's cleaning writes, before the leak check (when there is one):
    the tests of the cleaner must not lean on the check that backs it up."""
    from adit_tasks.core.pseudonymize import Pseudonymizer

    data = ds_or_data if isinstance(ds_or_data, bytes) else encoded(ds_or_data)
    p = Pseudonymizer(secret, options)  # type: ignore[arg-type]
    instance = DicomInstance.from_bytes(data)
    unverified = getattr(p, "pseudonymize_unverified", None)
    if unverified is not None:
        return unverified(instance, **kwargs)[0].data
    return p.pseudonymize(instance, **kwargs).data
