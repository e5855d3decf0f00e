"""Instances as they travel through ADIT, and the bounded stream that carries them.

An instance is the DICOM Part 10 file exactly as the PACS sent it (preamble, file meta with
the transfer syntax it was sent in, then the data set bytes untouched). Nothing is transcoded.

`DicomInstance.from_bytes` is the boundary for instances a peer sends (C-GET, C-MOVE,
WADO-RS): an instance is only made from bytes that parse, whose UIDs are well-formed (digits
and dots, at most 64 characters: PS3.5 9.1, so they are safe as file names) and whose native
pixel data is as long as its header says. Anything else raises `InvalidInstance` with a reason
that names the attribute, never its value; the retrieval puts it aside as `Rejected`.

Retrievals run the network side in a background thread and hand instances over through a
bounded queue: the consumer pulls one instance at a time, and a slow consumer makes the PACS
wait (its next C-STORE is not answered yet) instead of filling memory.
"""

from __future__ import annotations

import contextvars
import io
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

from pydicom import Dataset, dcmread
from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import StoragePresentationContexts

from adit_tasks.core.errors import InvalidInstance

# Uncompressed first (what most PACS store), then every compressed syntax pydicom knows, so
# a PACS can send an instance in the syntax it is stored in.
UNCOMPRESSED: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
TRANSFER_SYNTAXES: list[str] = UNCOMPRESSED + [
    ts for ts in AllTransferSyntaxes if ts not in UNCOMPRESSED
]

STORAGE_SOP_CLASSES: list[str] = [cx.abstract_syntax for cx in StoragePresentationContexts]


@dataclass(frozen=True)
class DicomInstance:
    """One received instance: Part 10 bytes plus the UIDs needed to route and count it."""

    data: bytes
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_uid: str
    series_uid: str
    # For folder names, so writers need not parse the header again.
    series_number: str = ""
    modality: str = ""
    series_description: str = ""

    @classmethod
    def from_bytes(cls, data: bytes) -> DicomInstance:
        """Check a Part 10 file a peer sent (see the module docstring) and read what it is;
        InvalidInstance naming the attribute that fails."""
        try:
            # Large values stay unread (defer_size): their lengths are all the check needs.
            ds = dcmread(io.BytesIO(data), defer_size=1024, force=False)
        except Exception:
            raise InvalidInstance("not a DICOM Part 10 file (does not parse)") from None
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
            raise InvalidInstance("file meta has no TransferSyntaxUID")
        instance = cls.from_dataset_header(data, ds)
        _check_pixel_length(ds, instance.transfer_syntax)
        return instance

    @classmethod
    def from_dataset_header(cls, data: bytes, ds: Dataset) -> DicomInstance:
        """The instance of a parsed header; InvalidInstance if a UID is missing or malformed."""
        return cls(
            data=data,
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            sop_class_uid=_uid(ds, "SOPClassUID"),
            transfer_syntax_uid=_uid(ds.file_meta, "TransferSyntaxUID"),
            study_uid=_uid(ds, "StudyInstanceUID"),
            series_uid=_uid(ds, "SeriesInstanceUID"),
            series_number=_text(ds, "SeriesNumber"),
            modality=_text(ds, "Modality"),
            series_description=_text(ds, "SeriesDescription"),
        )

    @cached_property
    def dataset(self) -> Dataset:
        """The full data set, parsed lazily (pixel data stays raw bytes until touched)."""
        return dcmread(io.BytesIO(self.data))

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.transfer_syntax_uid)


def raw_value(ds: Dataset, keyword: str) -> str:
    """A short ASCII value as sent, read from the raw element: pydicom's value validation
    is not run, because its warnings would print the value (patient data in logs)."""
    elem = ds.get_item(tag_for_keyword(keyword))
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    text = value.decode("ascii", "ignore") if isinstance(value, bytes) else str(value)
    return text.strip(" \0")


def is_uid(value: str) -> bool:
    """Digits and dots, no leading zeros, at most 64 characters (PS3.5 9.1)."""
    return UID(value, validation_mode=pydicom_config.IGNORE).is_valid


def _uid(ds: Dataset, keyword: str) -> str:
    value = raw_value(ds, keyword)
    if not value:
        raise InvalidInstance(f"{keyword} missing")
    if not is_uid(value):
        raise InvalidInstance(f"{keyword} is not a valid UID (digits and dots, at most "
                              "64 characters)")
    return value


def _text(ds: Dataset, keyword: str) -> str:
    return raw_value(ds, keyword)


def _check_pixel_length(ds: Dataset, syntax: UID) -> None:
    """Native (uncompressed) pixel data must hold every frame the header announces."""
    if "PixelData" not in ds or syntax.is_compressed:
        return
    elem = ds.get_item("PixelData")
    length = getattr(elem, "length", None)
    if length is None:
        length = len(elem.value or b"")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise InvalidInstance("image pixel attributes (Rows, Columns, BitsAllocated) missing "
                              "or not numbers") from None
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if length < expected:
        raise InvalidInstance(f"PixelData holds {length} bytes, the header announces "
                              f"{expected}")


@dataclass(frozen=True)
class Rejected:
    """An instance a retrieval received but put aside, and why (never its values)."""

    reason: str


_DONE = object()


class InstanceStream:
    """Iterator over instances produced by a background thread, with bounded buffering.

    `producer(put)` runs in a thread and calls `put(instance)` for each instance (or
    `put(Rejected(reason))` for one that failed the arrival checks: the consumer does not see
    those, `rejected` lists their reasons); it returns when the retrieval is over or raises its
    error, which the consumer then sees. When the consumer stops early (`close()`, or leaving a
    `with` block), `put` raises `StreamClosed` in the producer so it can abort its association.
    """

    def __init__(self, producer: Callable[[Callable[[DicomInstance], None]], None],
                 *, buffer: int = 8, name: str = "retrieve") -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buffer)
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self.rejected: list[str] = []
        # The producer runs in the caller's context (Prefect's API settings and run context
        # live in context variables, which a plain new thread would not see).
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run, producer),
                                        name=name, daemon=True)
        self._thread.start()

    def _put(self, instance: DicomInstance | Rejected) -> None:
        while True:
            if self._closed.is_set():
                raise StreamClosed("the consumer stopped reading")
            try:
                self._queue.put(instance, timeout=0.2)
                return
            except queue.Full:
                continue

    def _run(self, producer: Callable[[Callable[[DicomInstance], None]], None]) -> None:
        try:
            producer(self._put)
        except StreamClosed:
            pass
        except BaseException as exc:
            self._error = exc
        finally:
            while not self._closed.is_set():
                try:
                    self._queue.put(_DONE, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> Iterator[DicomInstance]:
        return self

    def __next__(self) -> DicomInstance:
        while True:
            if self._closed.is_set():
                raise StopIteration
            item = self._queue.get()
            if item is _DONE:
                self._closed.set()
                self._thread.join()
                if self._error is not None:
                    raise self._error
                raise StopIteration
            if isinstance(item, Rejected):
                self.rejected.append(item.reason)
                continue
            return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop early: the producer is told to abort, and its thread is waited for."""
        self._closed.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> InstanceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamClosed(Exception):
    """Raised inside a producer when its consumer has stopped reading."""
