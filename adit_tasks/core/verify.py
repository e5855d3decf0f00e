"""The leak check every pseudonymized instance passes before it leaves: ADIT's own proof, per
instance, that the bytes it sends hold none of the original identifying values.

It looks at the encoded output, not at the pseudonymizer's data structures:
- the preamble is zeroed;
- outside the pixel data element, the bytes (decoded per the instance's character set, folded
  like `scrub.fold`) contain none of the instance's identifying values in any spelling
  (`scrub.Terms`), and none of the UIDs the instance or its study carried;
- PatientIdentityRemoved is YES and DeidentificationMethodCodeSequence is present.

Cost: the fast check is one regular expression over the folded header text (no boundaries, so
it finds more than a leak: a value's neighbours in the encoding are length and tag bytes) and
a few substring tests for the UIDs. Only when it finds something is the output parsed and each
element checked with the word rules of the cleaner, which names the attribute. Values ADIT
writes itself (the declaration, the trial attributes, the pseudonym, dates it shifted or was
asked to keep) are not held against it.

An instance that fails raises `LeakFound` naming the attribute, never the value; the transfer
withholds it (see `transfer._prepare`).
"""

from __future__ import annotations

import struct
from codecs import lookup
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from pydicom import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from adit_tasks.core.errors import PermanentError
from adit_tasks.core.part10 import element_end, pixel_span, split
from adit_tasks.core.raw import (
    BINARY_VRS,
    DUMMIES,
    NUMBER_VRS,
    PIXEL_TAGS,
    STRING_VRS,
    TEXT_VRS,
    charset_of,
    decode_ascii,
    decode_text,
    elements,
    items,
    private_vr,
    vr_of,
)
from adit_tasks.core.scrub import NUMBERS, Terms, dates_in, fold

_STRONG = 5  # in binary values only terms of this length count (random bytes spell "Li")
_METHOD_CODES = 0x00120064  # DeidentificationMethodCodeSequence


class LeakFound(PermanentError):
    """A pseudonymized instance failed the leak check: it is withheld, never sent."""

    def __init__(self, attribute: str, what: str = "identifying value") -> None:
        super().__init__(f"{what} in {attribute}")
        self.attribute = attribute
        self.what = what


@dataclass(frozen=True)
class Evidence:
    """What the original instance carried, and what ADIT wrote on purpose."""

    terms: Terms
    uids: frozenset[str]  # UIDs of the instance that were replaced
    study_uids: frozenset[str] = frozenset()  # UIDs of the study (e.g. its other instances)
    written_dates: frozenset[str] = frozenset()  # YYYYMMDD written into DA/DT (kept, shifted)
    declared: Mapping[int, str] = field(default_factory=dict)  # top-level tag -> value
    codecs: tuple[str, ...] = ("iso8859",)

    @cached_property
    def strong(self) -> Terms:
        return Terms(frozenset(n for n in self.terms.names if len(n) >= _STRONG),
                     frozenset(i for i in self.terms.ids if len(i) >= _STRONG),
                     self.terms.dates)


def verify(data: bytes, evidence: Evidence, pixel: tuple[int, int] | None = None) -> None:
    """Raise LeakFound unless the pseudonymized Part 10 file `data` passes (module docstring).
    `pixel`: where the pixel data element lies, if the caller knows (checked, not trusted)."""
    if data[:128].strip(b"\0") or data[128:132] != b"DICM":
        raise LeakFound("the file preamble", "data")
    if pixel is None or not _is_pixel_element(data, pixel):
        pixel = pixel_span(data)
    header = data[132:] if pixel is None else data[132:pixel[0]] + data[pixel[1]:]
    if _needs_parse(header, evidence) or not _declared(header):
        _check_elements(data, evidence)


def _is_pixel_element(data: bytes, span: tuple[int, int]) -> bool:
    start, end = span
    if not 132 <= start < end <= len(data):
        return False
    group, element = struct.unpack_from("<HH", data, start)
    if (group << 16 | element) not in PIXEL_TAGS:
        return False
    # The output is written in the syntax of the input: explicit VR has the VR here.
    implicit = data[start + 4:start + 6] not in (b"OB", b"OW", b"OF", b"OD")
    return element_end(data, start, implicit, True) == end


def _needs_parse(header: bytes, evidence: Evidence) -> bool:
    """The fast check: could the header hold an original value? (True when unsure.)"""
    codecs = evidence.codecs
    if (len(codecs) > 1 or b"\x1b" in header or _deflated(header)
            or header.count(b"\x08\x00\x05\x00") > 1):
        # Code extensions, a character set of its own in an item, or a compressed data set:
        # check element by element.
        return True
    latin = header.decode("latin-1")
    if any(uid in latin for uid in evidence.uids):
        return True
    study = evidence.study_uids
    if study and any(t in study or t[:-1] in study for t in NUMBERS.findall(latin)):
        return True
    pattern = evidence.terms.loose
    if pattern is None:
        return False
    # Latin-1 and UTF-8 always (an item may say ISO_IR 192 where the data set says nothing),
    # and the data set's own character set.
    try:
        names = {"iso8859-1", "utf-8", lookup(codecs[0]).name}
    except LookupError:
        return True
    texts = [latin] + [header.decode(name, "replace") for name in sorted(names - {"iso8859-1"})]
    return any(pattern.search(fold(t)) for t in texts)


def _deflated(header: bytes) -> bool:
    return DeflatedExplicitVRLittleEndian.encode() in header[:1024]


def _declared(header: bytes) -> bool:
    """PatientIdentityRemoved = YES and a DeidentificationMethodCodeSequence, as encoded."""
    removed = b"\x12\x00\x62\x00"
    method = struct.pack("<HH", _METHOD_CODES >> 16, _METHOD_CODES & 0xFFFF)
    return ((removed + b"CS\x04\x00YES " in header
             or removed + b"\x04\x00\x00\x00YES " in header) and method in header)


def _check_elements(data: bytes, evidence: Evidence) -> None:
    """The precise check, element by element; raises LeakFound naming the first attribute.
    The pixel data element is not read."""
    parts = split(data)
    ds = parts.dataset
    if str(_value_of(ds, 0x00120062)).strip() != "YES":
        raise LeakFound("PatientIdentityRemoved", "no YES")
    if _METHOD_CODES not in ds:
        raise LeakFound("DeidentificationMethodCodeSequence", "missing")
    for tag in ds.file_meta.keys():  # noqa: SIM118 (iterating would convert values)
        elem = ds.file_meta.get_item(tag)
        if elem is not None and elem.VR == "UI":
            _check_uids(decode_ascii(_bytes(elem)), evidence, keyword_for_tag(tag))
    _walk(ds, evidence, evidence.codecs, "", top=True)
    if parts.trailer is not None:
        _walk(parts.trailer, evidence, charset_of(ds, evidence.codecs), "", top=True)


def _walk(ds: Dataset, evidence: Evidence, codecs: tuple[str, ...], path: str,
          top: bool = False) -> None:
    codecs = charset_of(ds, codecs)
    for tag, elem in elements(ds):
        if top and (int(tag) in PIXEL_TAGS or int(tag) == _METHOD_CODES):
            continue  # the pixel data; the declaration ADIT writes from its own constants
        name = path + (keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})")
        vr = private_vr(ds, elem) if tag.is_private else vr_of(elem)
        if elem.VR == "SQ" or (vr == "SQ" and elem.VR is None):
            for item in items(ds, tag):
                _walk(item, evidence, codecs, name + ">")
            continue
        value = _bytes(elem)
        if top and int(tag) in evidence.declared and \
                _text(value, vr or "LO", codecs) == evidence.declared[int(tag)]:
            continue
        _check_value(value, vr or elem.VR or "UN", codecs, evidence, name)


def _check_value(value: bytes, vr: str, codecs: tuple[str, ...], evidence: Evidence,
                 name: str) -> None:
    if not value:
        return
    if vr == "UI":
        _check_uids(decode_ascii(value), evidence, name)
        return
    if vr in ("DA", "DT"):
        dates = dates_in(decode_ascii(value))
        if (dates & evidence.terms.dates) - evidence.written_dates:
            raise LeakFound(name)
        return
    if vr in STRING_VRS:
        text = _text(value, vr, codecs)
        if text.strip() == DUMMIES.get(vr, DUMMIES["LO"]):
            return  # what a D action writes (an original name "Anonymized" is no leak there)
        _check_uids(text, evidence, name)
        pattern = evidence.terms.precise
        if pattern is not None and pattern.search(fold(text)):
            raise LeakFound(name)
        return
    # Binary and numbers (and elements of unknown meaning): the strong terms, as text.
    pattern = evidence.strong.precise
    texts = [value.decode("latin-1")] + [value.decode(c, "replace") for c in codecs[:1]
                                         if c not in ("iso8859", "latin_1")]
    if pattern is not None and any(pattern.search(fold(t)) for t in texts):
        raise LeakFound(name)
    if vr not in BINARY_VRS | NUMBER_VRS:
        _check_uids(texts[0], evidence, name)


def _check_uids(text: str, evidence: Evidence, name: str) -> None:
    for token in NUMBERS.findall(text):
        if token in evidence.uids or token in evidence.study_uids:
            raise LeakFound(name, "original UID")


def _text(value: bytes, vr: str, codecs: tuple[str, ...]) -> str:
    return decode_text(value, vr, codecs) if vr in TEXT_VRS else decode_ascii(value)


def _bytes(elem: object) -> bytes:
    value = getattr(elem, "value", None)
    if isinstance(value, bytes):
        return value
    if value is None:
        return b""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).encode("utf-8")  # type: ignore[union-attr]
    return str(value).encode("utf-8")


def _value_of(ds: Dataset, tag: int) -> str:
    elem = ds.get_item(tag)
    return "" if elem is None else decode_ascii(_bytes(elem))
