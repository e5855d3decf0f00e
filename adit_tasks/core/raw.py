"""Element values read from their encoded bytes and written back, without pydicom's value
conversion.

pydicom validates a value when it converts it, and its warning prints the value ("Invalid value
for VR IS: '<value>'"): a Patient ID stored in an IS attribute would reach the log. So the
pseudonymizer and the leak check never let pydicom convert an original value: they read the
raw bytes (`Dataset.get_item`), decode text themselves, and write new values as elements made
with validation off (`element`). Only sequences are converted (that parses their items, which
stay raw), and the data set's character set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache

from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.charset import decode_bytes, python_encoding
from pydicom.datadict import get_entry, private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

# Text that can name a person or carry an identifier (PS3.5 6.2).
TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE"})
# Strings with a grammar of their own (codes, numbers, dates, UIDs, ages).
CODED_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
STRING_VRS = TEXT_VRS | CODED_VRS
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
NUMBER_VRS = frozenset({"AT", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"})
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# What a D (dummy) action writes, by VR; text VRs get the LO one.
DUMMIES = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y",
           "DS": "0", "IS": "0", "UI": "2.25.0", "LO": "ANONYMIZED"}

# What each string VR may contain when it holds no text (PS3.5 Table 6.2-1, lengths aside:
# many devices write 17-digit DS values, and that is no reason to drop a pixel spacing).
_GRAMMAR = {
    "DA": re.compile(r"[0-9.\- ]*"),
    "DS": re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *| *"),
    "DT": re.compile(r"[0-9.+\- ]*"),
    "IS": re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *| *"),
    "TM": re.compile(r"[0-9.: ]*"),
    "UI": re.compile(r"[0-9.]*"),
}


@cache
def dictionary_vr(tag: int) -> str | None:
    """The VR the data dictionary gives a public tag (repeating groups included; the first of
    'OB or OW'), None if the tag is unknown."""
    try:
        vr = get_entry(tag)[0]
    except KeyError:
        return None
    return None if vr == "NONE" else vr.split(" or ")[0]


def vr_of(elem: DataElement | RawDataElement) -> str | None:
    """What a public element means: the dictionary's VR (an element sent as UN, or in implicit
    VR, is read as the attribute it is), the encoded one where the dictionary allows several;
    None for a tag the dictionary does not know."""
    known = dictionary_vr(int(elem.tag))
    if known is None:
        return None
    encoded = elem.VR
    if encoded and encoded != "UN" and " or " in get_entry(int(elem.tag))[0]:
        return encoded
    return known


def private_vr(ds: Dataset, elem: DataElement | RawDataElement) -> str | None:
    """The VR of a private element: as encoded (explicit VR), else what pydicom's private
    dictionary says for its block's creator; None if neither knows."""
    if elem.VR and elem.VR != "UN":
        return elem.VR
    tag = Tag(elem.tag)
    if tag.is_private_creator:
        return "LO"
    creator = ds.get_item((tag.group << 16) | (tag.element >> 8))
    if creator is None or not isinstance(creator.value, bytes | str):
        return None
    name = creator.value.decode("latin-1") if isinstance(creator.value, bytes) else creator.value
    try:
        vr = private_dictionary_VR(tag, name.strip(" \0"))
    except KeyError:
        return None
    return vr.split(" or ")[0]


def elements(ds: Dataset) -> Iterator[tuple[BaseTag, DataElement | RawDataElement]]:
    """(tag, element) of `ds` in tag order, raw where pydicom has not converted it."""
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        if elem is not None:
            yield Tag(tag), elem


def is_sequence(elem: DataElement | RawDataElement, vr: str | None) -> bool:
    return elem.VR == "SQ" or (vr == "SQ" and elem.VR in (None, "SQ"))


def items(ds: Dataset, tag: BaseTag) -> list[Dataset]:
    """The items of a sequence element (converting the sequence, not the items' values)."""
    value = ds[tag].value
    return list(value) if isinstance(value, Sequence | list) else []


def raw_bytes(elem: DataElement | RawDataElement) -> bytes:
    value = elem.value
    if isinstance(value, bytes):
        return value
    if value is None:
        return b""
    raise TypeError("element already converted")  # the callers only read original elements


@cache
def encodings_of(charset: str) -> tuple[str, ...]:
    """Python codecs for a SpecificCharacterSet value ('\\'-separated terms); terms pydicom
    does not know fall back to its default (Latin-1), without a warning that would print
    them."""
    terms = [t.strip() for t in charset.split("\\")] or [""]
    codecs = [python_encoding.get(t or "ISO_IR 6", "iso8859") for t in terms]
    return tuple(codecs or ["iso8859"])


def charset_of(ds: Dataset, inherited: tuple[str, ...] = ("iso8859",)) -> tuple[str, ...]:
    """The codecs of `ds`'s own SpecificCharacterSet, else the inherited ones."""
    elem = ds.get_item(0x00080005)
    if elem is None or not elem.value:
        return inherited
    value = elem.value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else "\\".join(
        value if isinstance(value, list | tuple) else [str(value)])  # type: ignore[arg-type]
    return encodings_of(text)


def decode_text(value: bytes, vr: str, codecs: tuple[str, ...]) -> str:
    """A text value as a str (trailing padding removed), never failing or warning."""
    if b"\x1b" in value and len(codecs) > 1:  # ISO 2022 code extensions
        delims = PN_DELIMS if vr == "PN" else TEXT_VR_DELIMS
        text = decode_bytes(value, list(codecs), delims)
    else:
        try:
            text = value.decode(codecs[0], "replace")
        except LookupError:
            text = value.decode("latin-1")
    return text.rstrip(" \0")


def decode_ascii(value: bytes) -> str:
    return value.decode("latin-1").rstrip(" \0")


def fits_grammar(vr: str, text: str) -> bool:
    """Whether every value of a coded string VR is what the VR allows (no text hidden in a
    number, date or code)."""
    grammar = _GRAMMAR.get(vr)
    return grammar is None or all(grammar.fullmatch(v) for v in text.split("\\"))


def element(tag: int, vr: str, value: object) -> DataElement:
    """A new element, built with pydicom's validation off (values we write are ours)."""
    return DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE)


def empty_value(vr: str) -> object:
    if vr == "SQ":
        return Sequence()
    if vr in STRING_VRS:
        return ""
    if vr in BINARY_VRS:
        return b""
    return None
