"""A Part 10 file as header, pixel data element and trailer, so that pseudonymization rewrites
the header and keeps the pixel data element's bytes exactly as received.

`split` parses everything before the top-level pixel data element (Pixel Data, Float or Double
Float Pixel Data), finds where that element ends (native: its length; encapsulated: its items
up to the sequence delimiter) and parses what follows it (padding, private groups). `join`
writes a header and a trailer around the original pixel element bytes. Files where this does
not apply (deflated syntax, no pixel data, elements out of order, a syntax that does not match
the encoding) come back whole, as one data set.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pydicom import Dataset, dcmread, dcmwrite
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from adit_tasks.core.raw import PIXEL_TAGS

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


@dataclass
class Parts:
    """The data set before the pixel data (with file meta), where the pixel data element lies
    in the original bytes (None: not split, `dataset` is the whole file), and the trailer."""

    dataset: Dataset
    pixel: tuple[int, int] | None = None
    trailer: Dataset | None = None

    @property
    def implicit(self) -> bool:
        return bool(self.dataset.original_encoding[0])

    @property
    def little(self) -> bool:
        return self.dataset.original_encoding[1] is not False


def split(data: bytes) -> Parts:
    """The parts of a Part 10 file (see the module docstring)."""
    fp = io.BytesIO(data)
    ds = dcmread(fp, stop_before_pixels=True)
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
    implicit, little = ds.original_encoding
    if syntax == DeflatedExplicitVRLittleEndian:
        return Parts(dcmread(io.BytesIO(data)))
    if (implicit, little) != _encoding(syntax):
        # Encoded otherwise than its syntax says (pydicom follows the bytes): written anew.
        return Parts(dcmread(io.BytesIO(data)))
    start = fp.tell()
    end = element_end(data, start, bool(implicit), little is not False)
    if start >= len(data) or end is None or _tag_at(data, start, little) not in PIXEL_TAGS:
        return Parts(dcmread(io.BytesIO(data)))
    pixel_tag = _tag_at(data, start, little)
    trailer = None
    if end < len(data):
        trailer = read_dataset(io.BytesIO(data[end:]), bool(implicit), little is not False,
                               parent_encoding=ds.original_character_set)
    # (keys(): iterating a Dataset would convert its elements, and their values)
    before = all(int(t) < pixel_tag for t in ds.keys())  # noqa: SIM118
    after = trailer is None or all(int(t) > pixel_tag for t in trailer.keys())  # noqa: SIM118
    if not (before and after):  # elements out of order: write the whole file again
        return Parts(dcmread(io.BytesIO(data)))
    return Parts(ds, (start, end), trailer)


def join(parts: Parts, original: bytes) -> tuple[bytes, tuple[int, int] | None]:
    """The Part 10 bytes of the (changed) parts, with the original pixel data element; and
    where the pixel data element lies in them."""
    out = io.BytesIO()
    dcmwrite(out, parts.dataset, enforce_file_format=True)
    if parts.pixel is None:
        return out.getvalue(), None
    start, end = parts.pixel
    header = out.getvalue()
    chunks: list[bytes | memoryview] = [header, memoryview(original)[start:end]]
    if parts.trailer is not None and len(parts.trailer):
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = parts.implicit, parts.little
        write_dataset(fp, parts.trailer, parent_encoding=_charset_terms(parts.dataset))
        chunks.append(fp.getvalue())
    return b"".join(chunks), (len(header), len(header) + end - start)


def element_end(data: bytes, pos: int, implicit: bool, little: bool) -> int | None:
    """Where the element starting at `pos` ends (None if it runs past the data or its
    encapsulated items are malformed)."""
    order = "<" if little else ">"
    try:
        pos += 4
        if implicit:
            (length,) = struct.unpack_from(order + "L", data, pos)
            pos += 4
        elif data[pos:pos + 2] in _LONG_VRS:
            (length,) = struct.unpack_from(order + "L", data, pos + 4)
            pos += 8
        else:
            (length,) = struct.unpack_from(order + "H", data, pos + 2)
            pos += 4
        if length != 0xFFFFFFFF:
            return pos + length if pos + length <= len(data) else None
        while pos + 8 <= len(data):
            group, element, length = struct.unpack_from(order + "HHL", data, pos)
            pos += 8
            if (group, element) == _SEQUENCE_END:
                return pos
            if (group, element) != _ITEM or length == 0xFFFFFFFF:
                return None
            pos += length
    except struct.error:
        return None
    return None


def pixel_span(data: bytes) -> tuple[int, int] | None:
    """Where the top-level pixel data element lies in a Part 10 file (None: no pixel data,
    or a file `split` would not split)."""
    parts = split(data)
    return parts.pixel


def _tag_at(data: bytes, pos: int, little: bool) -> int:
    group, element = struct.unpack_from("<HH" if little else ">HH", data, pos)
    return group << 16 | element


def _encoding(syntax: UID) -> tuple[bool, bool]:
    if syntax == ImplicitVRLittleEndian:
        return True, True
    if syntax == ExplicitVRBigEndian:
        return False, False
    return False, True


def _charset_terms(ds: Dataset) -> str | list[str]:
    elem = ds.get_item(0x00080005)
    if elem is None or not elem.value:
        return "ISO_IR 6"
    value = elem.value
    if isinstance(value, bytes):
        terms = value.decode("ascii", "replace").strip(" \0").split("\\")
    else:
        terms = list(value) if isinstance(value, list | tuple) else [str(value)]
    return [t.strip() for t in terms] if len(terms) > 1 else terms[0].strip()
