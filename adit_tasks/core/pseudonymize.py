"""Pseudonymization: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile,
driven by the table in `data/ps315_e1.csv`, plus the options a transfer asks for.

Why our own: every library we measured (dicognito, deid, dcm-anonymizer) leaked identifiers in
free text, private tags, file meta or sequences (see shared DESIGN.md).

What happens to one instance:
- Every data element at every nesting level gets the action of its row in the table (X remove,
  Z empty, D dummy, K keep, C clean, U new UID), or the action of an option column when that
  option is on. Where the standard allows a choice by IOD type (X/Z, Z/D, X/Z/D ...) we take the
  choice that keeps Type 1 and 2 attributes present: D where D is allowed, else Z.
- Attributes the table does not list: person names get a dummy, long free text (LT, ST, UT,
  UC) is cleaned (removed without the Clean Descriptors Option), short strings (LO, SH) other
  than code values are cleaned; everything else is kept.
- Every UID that is not a SOP class or transfer syntax UID is replaced by a keyed hash
  (`2.25.<decimal>`), table row or not (unless an active option keeps it, as Retain Device
  Identity keeps DeviceUID), so references between instances stay valid and the same input
  gives the same output in every run with the same secret.
- Private elements are removed, unless their private creator is listed as safe.
- File meta is rebuilt: class, new instance UID, transfer syntax; nothing else survives.
- "Clean" free text removes every identifying value the profile takes out of this same data set
  (names and their parts, IDs, institutions, private text, and dates unless they are kept), in
  the spellings free text uses (any case, ß/ss, ö/oe, without diacritics, several date
  formats), repeatedly until nothing matches. A name that appears nowhere in the data set's
  identifying attributes cannot be recognised: that is the limit of cleaning without NLP.
- Dates are kept, shifted by a per-patient offset (keyed), or removed, by option; only the date
  options decide about DA/DT attributes.
- PatientIdentityRemoved = YES and DeidentificationMethodCodeSequence (CID 7050) declare what
  was done; trial attributes are set after cleaning.
- Pixel data is never touched. An image flagged BurnedInAnnotation = YES is refused unless the
  caller allows it, because the profile cannot clean pixels.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import io
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from adit_tasks.core.errors import PermanentError
from adit_tasks.core.instances import DicomInstance

DateHandling = Literal["shift", "keep", "remove"]

_STRING_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
               "UC", "UR", "UT"}
_TEXT_VRS = {"LO", "LT", "SH", "ST", "UC", "UT", "PN"}
_LONG_TEXT_VRS = {"LT", "ST", "UT", "UC"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
# Code Value, Coding Scheme Designator/Version, Long Code Value: codes, not free text.
_CODED_VALUES = {0x00080100, 0x00080102, 0x00080103, 0x00080119}
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y",
          "DS": "0", "IS": "0", "UI": "2.25.0"}
_DUMMY_TEXT = "ANONYMIZED"
MAX_DATE_SHIFT_DAYS = 730


class BurnedInAnnotation(PermanentError):
    """The image says it has burned-in annotation: pixels may show identifying text."""


@dataclass(frozen=True)
class PseudonymizationOptions:
    """The PS3.15 options a transfer asks for. Defaults: dates shifted, descriptors cleaned."""

    dates: DateHandling = "shift"
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    clean_descriptors: bool = True
    safe_private_creators: frozenset[str] = frozenset()
    allow_burned_in: bool = False
    trial_protocol_id: str = ""
    trial_protocol_name: str = ""


@dataclass(frozen=True)
class _Rule:
    basic: str
    options: dict[str, str]


@cache
def profile_table() -> tuple[dict[int, _Rule], list[tuple[int, int, _Rule]]]:
    """Exact-tag rules and masked rules (e.g. (50xx,xxxx)) from the shipped PS3.15 table."""
    exact: dict[int, _Rule] = {}
    masked: list[tuple[int, int, _Rule]] = []
    text = (Path(__file__).parent / "data" / "ps315_e1.csv").read_text("utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        if "GGGG" in row["tag"]:
            continue  # "private attributes": handled by the private-tag rule, not by tag
        rule = _Rule(row["basic_profile_action"], {
            key: row[key] for key in row if key.endswith("_opt") and row[key]})
        group, element = row["tag"].strip("()\"").split(",")
        tag_hex = (group + element).upper()
        if "X" in tag_hex:
            mask = int("".join("0" if c == "X" else "F" for c in tag_hex), 16)
            value = int(tag_hex.replace("X", "0"), 16)
            masked.append((mask, value, rule))
        else:
            exact[int(tag_hex, 16)] = rule
    return exact, masked


def _rule_for(tag: BaseTag) -> _Rule | None:
    exact, masked = profile_table()
    rule = exact.get(int(tag))
    if rule is not None:
        return rule
    for mask, value, masked_rule in masked:
        if int(tag) & mask == value:
            return masked_rule
    return None


def _choose(action: str) -> str:
    """One action from a choice such as X/Z/D: keep the element present where allowed."""
    choices = action.replace("*", "").split("/")
    for preferred in ("U", "D", "Z", "K", "C", "X"):
        if preferred in choices:
            return preferred
    return "X"


# CID 7050 De-identification Method (PS3.16).
_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified_dates": ("113107",
                       "Retain Longitudinal Temporal Information Modified Dates Option"),
    "patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "device_identity": ("113109", "Retain Device Identity Option"),
    "safe_private": ("113111", "Retain Safe Private Option"),
}


# Option column of the PS3.15 table -> its CID 7050 code (None: no column of its own).
_OPTION_CODES: dict[str | None, str] = {
    "clean_desc_opt": "clean_descriptors",
    "rtn_long_full_dates_opt": "full_dates",
    "rtn_long_modif_dates_opt": "modified_dates",
    "rtn_pat_chars_opt": "patient_characteristics",
    "rtn_dev_id_opt": "device_identity",
    None: "safe_private",
}


class Pseudonymizer:
    """Keyed, deterministic pseudonymization of instances (see the module docstring)."""

    def __init__(self, secret: bytes | str, options: PseudonymizationOptions | None = None):
        if not secret:
            raise PermanentError("a pseudonymization secret is required")
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.options = options or PseudonymizationOptions()
        self._active = [column for column, _ in self._active_options() if column]
        self._actions: dict[tuple[int, str], tuple[str, bool]] = {}  # per (tag, VR)

    # --- keyed derivations ------------------------------------------------------------------

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def pseudonym_for(self, patient_id: str) -> str:
        """A stable pseudonym for a PatientID: same secret, same pseudonym."""
        return "P" + self._digest("patient", patient_id.strip()).hex()[:15].upper()

    def uid(self, original: str) -> str:
        """The replacement of a UID, `2.25.` plus 128 bits of a keyed hash (PS3.5 B.2)."""
        value = int.from_bytes(self._digest("uid", original.strip())[:16], "big")
        return f"2.25.{value}"

    def date_offset(self, patient_id: str) -> int:
        """Days all dates of this patient move back (1..MAX_DATE_SHIFT_DAYS)."""
        digest = self._digest("date", patient_id.strip())
        return 1 + int.from_bytes(digest[:4], "big") % MAX_DATE_SHIFT_DAYS

    # --- the profile -------------------------------------------------------------------------

    def _active_options(self) -> list[tuple[str | None, str]]:
        """(table column, CID 7050 code key) of every option in use."""
        o = self.options
        active = {
            "clean_desc_opt": o.clean_descriptors,
            "rtn_long_full_dates_opt": o.dates == "keep",
            "rtn_long_modif_dates_opt": o.dates == "shift",
            "rtn_pat_chars_opt": o.retain_patient_characteristics,
            "rtn_dev_id_opt": o.retain_device_identity,
            None: bool(o.safe_private_creators),  # handled by the private-tag rule
        }
        return [(column, code) for column, code in _OPTION_CODES.items() if active[column]]

    def _action(self, tag: BaseTag, vr: str) -> tuple[str, bool]:
        """(action, listed): the action for an element, and whether the table lists it."""
        key = (int(tag), vr)
        cached = self._actions.get(key)
        if cached is None:
            cached = self._actions[key] = self._resolve_action(tag, vr)
        return cached

    def _resolve_action(self, tag: BaseTag, vr: str) -> tuple[str, bool]:
        rule = _rule_for(tag)
        if rule is None:
            return self._unlisted_action(tag, vr), False
        columns = self._active
        if vr in ("DA", "DT") and self.options.dates != "keep":
            # Only the date options decide about dates: retaining device identity must not
            # bring back real calibration dates when dates are shifted or removed.
            columns = [c for c in columns if "dates" in c]
        actions = {rule.options[c] for c in columns if c in rule.options}
        # When two options disagree the cleaner action wins.
        for preferred in ("C", "K"):
            if preferred in actions:
                return preferred, True
        return _choose(rule.basic), True

    def _unlisted_action(self, tag: BaseTag, vr: str) -> str:
        """Attributes the table does not list: names are replaced, free text is cleaned (or
        removed without the Clean Descriptors Option), short strings are cleaned."""
        if vr == "PN":
            return "D"
        if vr in _LONG_TEXT_VRS:
            return "C" if self.options.clean_descriptors else "X"
        if vr in ("LO", "SH") and int(tag) not in _CODED_VALUES:
            return "C"
        return "K"

    def pseudonymize(self, instance: DicomInstance, pseudonym: str | None = None) -> DicomInstance:
        """The pseudonymized copy of one instance, in its original transfer syntax."""
        ds = dcmread(io.BytesIO(instance.data))
        self.pseudonymize_dataset(ds, pseudonym)
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        return DicomInstance.from_dataset_header(out.getvalue(), ds)

    def pseudonymize_dataset(self, ds: Dataset, pseudonym: str | None = None) -> Dataset:
        """Pseudonymize `ds` in place (file meta included) and return it."""
        if ds.get("BurnedInAnnotation", "").upper() == "YES" and not self.options.allow_burned_in:
            raise BurnedInAnnotation("image flagged with burned-in annotation; not sent")
        patient_id = str(ds.get("PatientID", ""))
        pseudonym = pseudonym or self.pseudonym_for(patient_id)
        context = _Context(
            identifiers=_identifying_values(ds, self),
            date_offset=self.date_offset(patient_id),
        )
        self._clean(ds, context)
        ds.PatientID = pseudonym
        ds.PatientName = pseudonym
        self._declare(ds, pseudonym)
        self._rebuild_file_meta(ds)
        return ds

    def _clean(self, ds: Dataset, context: _Context) -> None:
        creators_kept = self._safe_private_blocks(ds)
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private:
                if (tag.group, tag.element >> 8) not in creators_kept and not (
                        tag.is_private_creator and (tag.group, tag.element) in creators_kept):
                    del ds[tag]
                continue
            action, listed = self._action(tag, elem.VR)
            if elem.VR == "UI":
                if action not in ("X", "Z") and not (listed and action == "K"):
                    self._replace_uids(elem)  # K: an option keeps it (e.g. device UIDs)
                elif action in ("X", "Z"):
                    self._apply(ds, elem, action, context)
                continue
            self._apply(ds, elem, action, context)

    def _safe_private_blocks(self, ds: Dataset) -> set[tuple[int, int]]:
        """(group, block) of private blocks whose creator is listed as safe."""
        safe = self.options.safe_private_creators
        if not safe:
            return set()
        return {(e.tag.group, e.tag.element) for e in ds
                if e.tag.is_private_creator and str(e.value).strip() in safe}

    def _apply(self, ds: Dataset, elem: DataElement, action: str, context: _Context) -> None:
        tag = elem.tag
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence() if elem.VR == "SQ" else (None if elem.VR not in _STRING_VRS
                                                               else "")
        elif elem.VR == "SQ":
            if action in ("K", "C", "D", "U"):
                for item in elem.value:
                    self._clean(item, context)
        elif action == "D":
            if elem.VR in _STRING_VRS:
                elem.value = _DUMMY.get(elem.VR, _DUMMY_TEXT)
            elif elem.VR in _BINARY_VRS:
                elem.value = b"\0\0"  # present, even length, meaningless
            else:
                elem.value = 0  # numbers
        elif action == "C":
            self._clean_value(ds, elem, context)
        # K: keep as it is.

    def _clean_value(self, ds: Dataset, elem: DataElement, context: _Context) -> None:
        if elem.VR in ("DA", "DT"):
            if self.options.dates == "shift":
                elem.value = _shift(elem.value, elem.VR, context.date_offset)
            return
        if elem.VR == "TM" or elem.VR not in _TEXT_VRS:
            return  # times keep with dates; numbers and codes carry no free text
        cleaned = _scrub(elem.value, context.identifiers)
        if cleaned != elem.value:
            elem.value = cleaned

    def _replace_uids(self, elem: DataElement) -> None:
        if "SOPClassUID" in elem.keyword or elem.keyword == "TransferSyntaxUID":
            return  # SOP classes, including private ones a receiver must still recognise
        values = elem.value if elem.VM > 1 else [elem.value]
        new = [v if _is_well_known(str(v)) else self.uid(str(v)) for v in values if v]
        elem.value = new if elem.VM > 1 else (new[0] if new else "")

    def _declare(self, ds: Dataset, pseudonym: str) -> None:
        o = self.options
        ds.PatientIdentityRemoved = "YES"
        codes = ["basic"] + [code for _, code in self._active_options()]
        items = []
        for key in codes:
            item = Dataset()
            item.CodeValue, item.CodeMeaning = _CODES[key]
            item.CodingSchemeDesignator = "DCM"
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.DeidentificationMethod = "ADIT PS3.15 E.1 Basic Profile"[:64]
        ds.LongitudinalTemporalInformationModified = {
            "keep": "UNMODIFIED", "shift": "MODIFIED", "remove": "REMOVED"}[o.dates]
        if o.trial_protocol_id or o.trial_protocol_name:
            ds.ClinicalTrialProtocolID = o.trial_protocol_id or o.trial_protocol_name
            ds.ClinicalTrialProtocolName = o.trial_protocol_name
            ds.ClinicalTrialSponsorName = ds.get("ClinicalTrialSponsorName", "") or ""
            ds.ClinicalTrialSiteID = ""
            ds.ClinicalTrialSiteName = ""
            ds.ClinicalTrialSubjectID = pseudonym

    def _rebuild_file_meta(self, ds: Dataset) -> None:
        old = getattr(ds, "file_meta", FileMetaDataset())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = old.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ADIT"
        ds.file_meta = meta


@dataclass
class _Context:
    identifiers: re.Pattern[str] | None
    date_offset: int


def _is_well_known(uid: str) -> bool:
    """Class, transfer syntax and other UIDs defined by the standard stay as they are."""
    u = UID(uid)
    return u.is_transfer_syntax or u.name != uid or uid.startswith("1.2.840.10008.")


def _shift(value: object, vr: str, days: int) -> object:
    def one(v: str) -> str:
        v = str(v)
        if len(v) < 8 or not v[:8].isdigit():
            return ""
        try:
            day = dt.date(int(v[:4]), int(v[4:6]), int(v[6:8])) - dt.timedelta(days=days)
        except ValueError:
            return ""
        return day.strftime("%Y%m%d") + (v[8:] if vr == "DT" else "")

    if isinstance(value, str | bytes) or value is None:
        return one(value.decode() if isinstance(value, bytes) else (value or "")) if value else ""
    return [one(v) for v in value]  # type: ignore[union-attr]


def _identifying_values(ds: Dataset, pseudonymizer: Pseudonymizer) -> re.Pattern[str] | None:
    """A pattern matching every identifying value of `ds` in the spellings free text may use:
    whatever the profile removes or replaces (names and their parts, IDs, institutions ...),
    every private text value, and every date unless dates are kept as they are."""
    found: set[str] = set()
    keep_dates = pseudonymizer.options.dates == "keep"

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
                continue
            if not elem.value:
                continue
            if elem.tag.is_private:
                if elem.VR in _TEXT_VRS | {"UN"}:
                    _add_value(found, elem.VR, elem.value)
                continue
            if elem.VR in ("DA", "DT"):
                if not keep_dates or elem.tag == 0x00100030:  # birth date: never kept
                    _add_value(found, "DA", elem.value)
                continue
            if elem.VR not in _STRING_VRS:
                continue
            action, _ = pseudonymizer._action(elem.tag, elem.VR)
            if elem.VR == "PN" or action in ("X", "Z", "D"):
                _add_value(found, elem.VR, elem.value)

    walk(ds)
    if not found:
        return None
    alternatives = sorted(found, key=len, reverse=True)
    return re.compile("|".join(re.escape(a) for a in alternatives), re.IGNORECASE)


def _spellings(text: str) -> set[str]:
    """The ways a value may be written elsewhere: case-folded (ß -> ss), German
    transliteration (ö -> oe), and without diacritics."""
    german = text
    for a, b in (("ä", "ae"), ("ö", "oe"), ("ü", "ue"), ("Ä", "Ae"), ("Ö", "Oe"), ("Ü", "Ue"),
                 ("ß", "ss")):
        german = german.replace(a, b)
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return {v for v in (text, text.casefold(), german, plain) if len(v) >= 3}


def _add_value(found: set[str], vr: str, value: object) -> None:
    values: Iterable[object] = value if isinstance(value, list | tuple) or (
        type(value).__name__ == "MultiValue") else [value]
    for v in values:
        text = v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v)
        text = text.strip()
        if len(text) < 3:
            continue
        found.update(_spellings(text))
        if vr in ("PN", "UN", "LO"):
            for part in re.split(r"[\^=,\-\s]+", text):
                if len(part) >= 3 and not part.endswith("."):
                    found.update(_spellings(part))
        if vr == "DA" and re.fullmatch(r"\d{8}.*", text):
            y, m, d = text[:4], text[4:6], text[6:8]
            found.update({y + m + d, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}",
                          f"{m}/{d}/{y}", f"{y}/{m}/{d}", f"{d}.{m}.{y[2:]}"})


def _scrub(value: object, identifiers: re.Pattern[str] | None) -> object:
    if identifiers is None:
        return value
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [_scrub(v, identifiers) for v in value]  # type: ignore[union-attr]
    text = str(value)
    # Repeat: removing one value may join the pieces around it into another.
    for _ in range(10):
        cleaned = identifiers.sub(" ", text)
        if cleaned == text:
            break
        text = cleaned
    return re.sub(r"\s{2,}", " ", text).strip(" ,;:^")


__all__ = [
    "BurnedInAnnotation",
    "PseudonymizationOptions",
    "Pseudonymizer",
    "Tag",
    "profile_table",
]
