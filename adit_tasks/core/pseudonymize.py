"""Pseudonymization: the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile,
driven by the table in `data/ps315_e1.csv`, deny by default, plus the options a transfer asks
for; every instance then passes ADIT's own leak check before it may leave.

Why our own: every library we measured (dicognito, deid, dcm-anonymizer) leaked identifiers in
free text, private tags, file meta or sequences (see shared DESIGN.md).

What happens to one instance (docs/pseudonymization.md has the lists):
- Only the header is rewritten: the pixel data element's bytes go out exactly as they came
  (`part10.py`). The file preamble is zeroed; the file meta is rebuilt (class, new instance
  UID, transfer syntax; nothing else survives).
- Every data element at every nesting level gets its action (`deid_rules.py`): the action of
  its row in the table (X remove, Z empty, D dummy, K keep, C clean, U new UID), or of an
  option column when that option is on; attributes the table does not list are removed or
  replaced unless the keep list names them (deny by default); unknown tags go.
- Every UID that is not a SOP class or transfer syntax UID is replaced by a keyed hash
  (`2.25.<decimal>`), unless an active option keeps it (Retain Device Identity keeps
  DeviceUID), so references between instances stay valid and the same input gives the same
  output in every run with the same secret. UIDs written in text are replaced the same way.
- Private elements are removed, unless their private creator is listed as safe.
- Text that is kept is cleaned of every identifying value of the instance, in every spelling
  (`scrub.py`: names by part, IDs, dates, any case, with or without diacritics). A name that
  appears nowhere in the instance's attributes cannot be recognised: that is the limit of
  cleaning without NLP.
- Dates are kept, shifted by a per-patient offset (keyed), or removed, by option; only the date
  options decide about DA/DT/TM attributes, listed or not.
- PatientIdentityRemoved = YES and DeidentificationMethodCodeSequence (CID 7050) declare what
  was done; trial attributes (with the sponsor of `trial_sponsor`) are set after cleaning.
- An image flagged BurnedInAnnotation = YES is refused unless the caller allows it, because
  the profile cannot clean pixels.
- The result is checked (`verify.py`) before it is returned; an instance that fails raises
  LeakFound naming the attribute.

No original value goes through pydicom's value conversion (`raw.py`): its warnings would print
it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ImplicitVRLittleEndian

from adit_tasks.core import part10
from adit_tasks.core.deid_rules import (
    DEFAULT_TRIAL_SPONSOR,
    DateHandling,
    PseudonymizationOptions,
    Rules,
    profile_table,
)
from adit_tasks.core.errors import PermanentError
from adit_tasks.core.instances import DicomInstance, is_uid
from adit_tasks.core.raw import (
    BINARY_VRS,
    DUMMIES,
    STRING_VRS,
    TEXT_VRS,
    charset_of,
    decode_ascii,
    decode_text,
    element,
    elements,
    empty_value,
    fits_grammar,
    items,
    private_vr,
    vr_of,
)
from adit_tasks.core.scrub import Collector, Terms, fold, scrub
from adit_tasks.core.verify import Evidence, LeakFound, verify

MAX_DATE_SHIFT_DAYS = 730
_UID_CACHE = 100_000


class BurnedInAnnotation(PermanentError):
    """The image says it has burned-in annotation: pixels may show identifying text."""


@dataclass
class _Context:
    """One instance under way: its search terms, date offset, and what was written."""

    terms: Terms
    date_offset: int
    explicit: bool = True  # the output is in an explicit VR syntax
    written_dates: set[str] = field(default_factory=set)


class Pseudonymizer:
    """Keyed, deterministic pseudonymization of instances (see the module docstring)."""

    def __init__(self, secret: bytes | str, options: PseudonymizationOptions | None = None):
        if not secret:
            raise PermanentError("a pseudonymization secret is required")
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.options = options or PseudonymizationOptions()
        self.rules = Rules(self.options)
        self._uids: dict[str, str] = {}

    # --- keyed derivations ------------------------------------------------------------------

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).digest()

    def pseudonym_for(self, patient_id: str) -> str:
        """A stable pseudonym for a PatientID: same secret, same pseudonym."""
        return "P" + self._digest("patient", patient_id.strip()).hex()[:15].upper()

    def uid(self, original: str) -> str:
        """The replacement of a UID, `2.25.` plus 128 bits of a keyed hash (PS3.5 B.2)."""
        original = original.strip()
        new = self._uids.get(original)
        if new is None:
            if len(self._uids) > _UID_CACHE:
                self._uids.clear()
            value = int.from_bytes(self._digest("uid", original)[:16], "big")
            new = self._uids[original] = f"2.25.{value}"
        return new

    def date_offset(self, patient_id: str) -> int:
        """Days all dates of this patient move back (1..MAX_DATE_SHIFT_DAYS)."""
        digest = self._digest("date", patient_id.strip())
        return 1 + int.from_bytes(digest[:4], "big") % MAX_DATE_SHIFT_DAYS

    # --- one instance ------------------------------------------------------------------------

    def pseudonymize(self, instance: DicomInstance, pseudonym: str | None = None, *,
                     study_uids: frozenset[str] = frozenset()) -> DicomInstance:
        """The pseudonymized copy of one instance, in its original transfer syntax, checked:
        LeakFound if it fails the leak check (`verify.py`); `study_uids`: original UIDs of
        the study (its other instances) that must not appear either."""
        out, evidence, pixel = self._pseudonymize(instance, pseudonym, study_uids)
        verify(out.data, evidence, pixel)
        return out

    def pseudonymize_unverified(self, instance: DicomInstance, pseudonym: str | None = None,
                                *, study_uids: frozenset[str] = frozenset(),
                                ) -> tuple[DicomInstance, Evidence, tuple[int, int] | None]:
        """The pseudonymized copy without the leak check, with what `verify.verify` needs:
        for tests of the cleaner alone and for the benchmark."""
        return self._pseudonymize(instance, pseudonym, study_uids)

    def _pseudonymize(self, instance: DicomInstance, pseudonym: str | None,
                      study_uids: frozenset[str],
                      ) -> tuple[DicomInstance, Evidence, tuple[int, int] | None]:
        parts = part10.split(instance.data)
        evidence = self._pseudonymize_parts(parts, pseudonym, study_uids)
        data, pixel = part10.join(parts, instance.data)
        return DicomInstance.from_dataset_header(data, parts.dataset), evidence, pixel

    def pseudonymize_dataset(self, ds: Dataset, pseudonym: str | None = None) -> Dataset:
        """Pseudonymize `ds` in place (file meta included) and return it (not checked: the
        check looks at encoded bytes)."""
        self._pseudonymize_parts(part10.Parts(ds), pseudonym, frozenset())
        return ds

    def _pseudonymize_parts(self, parts: part10.Parts, pseudonym: str | None,
                            study_uids: frozenset[str]) -> Evidence:
        ds = parts.dataset
        burned_in = _text_of(ds.get_item(0x00280301), "CS", ("iso8859",))
        if burned_in.strip().upper() == "YES" and not self.options.allow_burned_in:
            raise BurnedInAnnotation("image flagged with burned-in annotation; not sent")
        codecs = charset_of(ds)
        patient_id = _text_of(ds.get_item(0x00100020), "LO", codecs)
        pseudonym = pseudonym or self.pseudonym_for(patient_id)
        collector, uids = Collector(), set()
        for part in (ds, parts.trailer):
            if part is not None:
                self._collect(part, codecs, collector, uids)
        declared = self._declared_values(pseudonym)
        syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
        context = _Context(collector.terms(), self.date_offset(patient_id),
                           explicit=syntax != ImplicitVRLittleEndian)
        for part in (ds, parts.trailer):
            if part is not None:
                self._clean(part, context, codecs)
        self._declare(ds, declared)
        self._rebuild_file_meta(ds)
        ds.preamble = b"\0" * 128
        return Evidence(context.terms, frozenset(uids), study_uids,
                        frozenset(context.written_dates), declared, codecs)

    # --- what the original carries -------------------------------------------------------------

    def _collect(self, ds: Dataset, codecs: tuple[str, ...], found: Collector,
                 uids: set[str]) -> None:
        """The identifying values of `ds` at every depth (removed sequences included: what
        they hold may be repeated in text that stays)."""
        codecs = charset_of(ds, codecs)
        for tag, elem in elements(ds):
            if tag.is_private or tag.group == 0x0002:
                continue
            vr = vr_of(elem)
            shape = _shape(elem, vr)
            if shape == "sequence":
                for item in items(ds, tag):
                    self._collect(item, codecs, found, uids)
                continue
            kind = self.rules.kind(int(tag), vr) if shape == "value" else None
            if kind is None:
                continue
            text = _text_of(elem, vr or "UN", codecs)
            if not text:
                continue
            if kind == "name":
                found.add_name(text)
            elif kind == "id":
                found.add_id(text)
            elif kind == "date":
                found.add_date(text)
            else:
                keyword = keyword_for_tag(tag)
                uids.update(v for v in _values(text) if not self._keeps_uid(keyword, v))

    # --- the profile ---------------------------------------------------------------------------

    def _clean(self, ds: Dataset, context: _Context, codecs: tuple[str, ...]) -> None:
        codecs = charset_of(ds, codecs)
        safe_blocks = self._safe_private_blocks(ds)
        for tag, elem in list(elements(ds)):
            if tag.is_private:
                self._private(ds, tag, elem, safe_blocks, context, codecs)
                continue
            vr = vr_of(elem)
            shape = _shape(elem, vr)
            if shape == "mismatch" or tag.group == 0x0002:
                del ds[tag]
                continue
            action, _ = self.rules.action(int(tag), vr)
            if action == "X":
                del ds[tag]
            elif action == "Z":
                ds[tag] = element(tag, vr or "UN", empty_value(vr or "UN"))
            elif shape == "sequence":
                for item in items(ds, tag):
                    self._clean(item, context, codecs)
            elif action == "D":
                ds[tag] = element(tag, vr or "UN", _dummy(vr or "UN"))
                if vr in ("DA", "DT"):
                    context.written_dates.add(DUMMIES["DA"])
            elif action == "U":
                self._replace_uids(ds, tag, elem, codecs)
            elif vr in STRING_VRS:
                self._keep(ds, tag, elem, vr, action, context, codecs)
            # Binary values and numbers stay as they are (K, C).
        _match_the_output_encoding(ds, context.explicit)

    def _keep(self, ds: Dataset, tag: BaseTag, elem: DataElement | RawDataElement, vr: str,
              action: str, context: _Context, codecs: tuple[str, ...]) -> None:
        """A string element the profile keeps (K) or cleans (C)."""
        text = _text_of(elem, vr, codecs)
        if vr in TEXT_VRS:
            cleaned = scrub(text, context.terms.precise, self._uid_in_text)
            if cleaned != text:
                ds[tag] = element(tag, vr, cleaned)
            return
        if not fits_grammar(vr, text):
            del ds[tag]  # text in a number, date, time or UID
            return
        if vr == "UI":
            return  # a UID an option keeps (device UIDs)
        if vr in ("DA", "DT"):
            if action == "C" and self.options.dates == "shift":
                shifted = _shift(text, vr, context.date_offset)
                ds[tag] = element(tag, vr, shifted)
                text = shifted
            context.written_dates.update(v[:8] for v in text.split("\\") if len(v) >= 8)
            return
        pattern = context.terms.precise
        if pattern is not None and pattern.search(fold(text)):
            del ds[tag]  # a code, number or time that is (part of) an identifying value

    def _private(self, ds: Dataset, tag: BaseTag, elem: DataElement | RawDataElement,
                 safe_blocks: set[tuple[int, int]], context: _Context,
                 codecs: tuple[str, ...]) -> None:
        kept = (tag.group, tag.element >> 8) in safe_blocks or (
            tag.is_private_creator and (tag.group, tag.element) in safe_blocks)
        vr = private_vr(ds, elem) if kept else None
        if not kept:
            del ds[tag]
        elif elem.VR == "SQ":
            for item in items(ds, tag):
                self._clean(item, context, codecs)
        elif vr in TEXT_VRS and not tag.is_private_creator:
            text = _text_of(elem, vr, codecs)
            cleaned = scrub(text, context.terms.precise, self._uid_in_text)
            if cleaned != text:
                ds[tag] = element(tag, vr, cleaned)

    def _safe_private_blocks(self, ds: Dataset) -> set[tuple[int, int]]:
        """(group, block) of private blocks whose creator is listed as safe."""
        safe = self.options.safe_private_creators
        if not safe:
            return set()
        return {(t.group, t.element) for t in map(Tag, ds.keys())
                if t.is_private_creator
                and _text_of(ds.get_item(t), "LO", ("iso8859",)).strip() in safe}

    def _keeps_uid(self, keyword: str, value: str) -> bool:
        """SOP classes (private ones too: a receiver must still recognise them), transfer
        syntaxes and UIDs the standard defines stay; anything else that is not a UID goes."""
        if "SOPClassUID" in keyword or keyword == "TransferSyntaxUID":
            return is_uid(value)
        return _is_well_known(value)

    def _replace_uids(self, ds: Dataset, tag: BaseTag, elem: DataElement | RawDataElement,
                      codecs: tuple[str, ...]) -> None:
        keyword = keyword_for_tag(tag)
        new = [v if self._keeps_uid(keyword, v) else self.uid(v)
               for v in _values(_text_of(elem, "UI", codecs))]
        ds[tag] = element(tag, "UI", new if len(new) > 1 else (new[0] if new else ""))

    def _uid_in_text(self, token: str) -> str | None:
        return None if _is_well_known(token) else self.uid(token)

    # --- declaration and file meta -------------------------------------------------------------

    def _declared_values(self, pseudonym: str) -> dict[int, str]:
        """The top-level values ADIT writes itself (the leak check does not hold them
        against the output)."""
        o = self.options
        values = {0x00100010: pseudonym, 0x00100020: pseudonym, 0x00120062: "YES",
                  0x00120063: "ADIT PS3.15 E.1 Basic Profile",
                  0x00280303: {"keep": "UNMODIFIED", "shift": "MODIFIED",
                               "remove": "REMOVED"}[o.dates]}
        if o.trial_protocol_id or o.trial_protocol_name:
            values.update({0x00120020: o.trial_protocol_id or o.trial_protocol_name,
                           0x00120021: o.trial_protocol_name,
                           0x00120010: o.trial_sponsor or DEFAULT_TRIAL_SPONSOR,
                           0x00120030: "", 0x00120031: "", 0x00120040: pseudonym})
        return values

    def _declare(self, ds: Dataset, declared: dict[int, str]) -> None:
        items_ = []
        for value, meaning in self.rules.method_codes():
            item = Dataset()
            item.CodeValue, item.CodeMeaning = value, meaning
            item.CodingSchemeDesignator = "DCM"
            items_.append(item)
        ds[0x00120064] = element(0x00120064, "SQ", Sequence(items_))
        vrs = {0x00100010: "PN", 0x00120062: "CS", 0x00280303: "CS"}
        for tag, value in declared.items():
            ds[tag] = element(tag, vrs.get(tag, "LO"), value)

    def _rebuild_file_meta(self, ds: Dataset) -> None:
        old = getattr(ds, "file_meta", FileMetaDataset())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _text_of(ds.get_item(0x00080016), "UI", ("iso8859",))
        meta.MediaStorageSOPInstanceUID = _text_of(ds.get_item(0x00080018), "UI",
                                                   ("iso8859",))
        meta.TransferSyntaxUID = old.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ADIT"
        ds.file_meta = meta


def _match_the_output_encoding(ds: Dataset, explicit: bool) -> None:
    """A file whose bytes are in another VR encoding than its syntax says (pydicom reads what
    the bytes are): its kept elements get the dictionary's VR, their value bytes unchanged
    (little endian text and numbers read the same in both), and the data set says it is
    already in the output's encoding, so that pydicom writes them as they are instead of
    converting them (which would run its value validation)."""
    implicit, little = ds.original_encoding
    if little is not False and implicit is not None and bool(implicit) == explicit:
        ds.set_original_encoding(not explicit, True, ds.original_character_set)
    if not explicit:
        return
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem.VR is None:
            vr = vr_of(elem) or ("LO" if Tag(tag).is_private_creator else "UN")
            if int(tag) == 0x7FE00010:
                vr = "OB" if elem.length == 0xFFFFFFFF else "OW"
            ds[tag] = elem._replace(VR=vr, is_implicit_VR=False)


def _shape(elem: DataElement | RawDataElement, vr: str | None) -> str:
    """'sequence', 'value', or 'mismatch' (a sequence sent as UN or as another VR, or a value
    where the dictionary has a sequence: removed, never guessed at)."""
    if vr == "SQ":
        return "sequence" if elem.VR in (None, "SQ") else "mismatch"
    return "mismatch" if elem.VR == "SQ" else "value"


def _text_of(elem: DataElement | RawDataElement | None, vr: str,
             codecs: tuple[str, ...]) -> str:
    """The value of a string element as text, read from its bytes when it is raw."""
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return decode_text(value, vr, codecs) if vr in TEXT_VRS else decode_ascii(value)
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[union-attr]
    return str(value)


def _values(text: str) -> list[str]:
    return [v.strip(" \0") for v in text.split("\\") if v.strip(" \0")]


def _dummy(vr: str) -> object:
    if vr in STRING_VRS:
        return DUMMIES.get(vr, DUMMIES["LO"])
    if vr in BINARY_VRS:
        return b"\0\0"  # present, even length, meaningless
    return 0  # numbers


def _is_well_known(uid: str) -> bool:
    """Class, transfer syntax and other UIDs defined by the standard stay as they are."""
    if not is_uid(uid):
        return False
    u = UID(uid)
    return u.is_transfer_syntax or u.name != uid or uid.startswith("1.2.840.10008.")


def _shift(text: str, vr: str, days: int) -> str:
    def one(v: str) -> str:
        v = v.strip()
        if len(v) < 8 or not v[:8].isdigit():
            return ""
        try:
            day = dt.date(int(v[:4]), int(v[4:6]), int(v[6:8])) - dt.timedelta(days=days)
        except ValueError:
            return ""
        return day.strftime("%Y%m%d") + (v[8:] if vr == "DT" else "")

    return "\\".join(one(v) for v in text.split("\\"))


__all__ = [
    "DEFAULT_TRIAL_SPONSOR",
    "BurnedInAnnotation",
    "DateHandling",
    "LeakFound",
    "PseudonymizationOptions",
    "Pseudonymizer",
    "Tag",
    "profile_table",
]
