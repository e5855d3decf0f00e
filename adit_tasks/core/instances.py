"""Instances as they travel through ADIT, and the bounded stream that carries them.

An instance is the DICOM Part 10 file exactly as the PACS sent it (preamble, file meta with
the transfer syntax it was sent in, then the data set bytes untouched). Nothing is transcoded.

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
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import StoragePresentationContexts

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
        """Parse just enough of a Part 10 file to know what it is."""
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
        return cls.from_dataset_header(data, ds)

    @classmethod
    def from_dataset_header(cls, data: bytes, ds: Dataset) -> DicomInstance:
        return cls(
            data=data,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            study_uid=str(ds.get("StudyInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            series_number=str(ds.get("SeriesNumber", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            series_description=str(ds.get("SeriesDescription", "") or ""),
        )

    @cached_property
    def dataset(self) -> Dataset:
        """The full data set, parsed lazily (pixel data stays raw bytes until touched)."""
        return dcmread(io.BytesIO(self.data))

    @property
    def transfer_syntax(self) -> UID:
        return UID(self.transfer_syntax_uid)


_DONE = object()


class InstanceStream:
    """Iterator over instances produced by a background thread, with bounded buffering.

    `producer(put)` runs in a thread and calls `put(instance)` for each instance; it returns
    when the retrieval is over or raises its error, which the consumer then sees. When the
    consumer stops early (`close()`, or leaving a `with` block), `put` raises `StreamClosed`
    in the producer so it can abort its association.
    """

    def __init__(self, producer: Callable[[Callable[[DicomInstance], None]], None],
                 *, buffer: int = 8, name: str = "retrieve") -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buffer)
        self._closed = threading.Event()
        self._error: BaseException | None = None
        # The producer runs in the caller's context (Prefect's API settings and run context
        # live in context variables, which a plain new thread would not see).
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run, producer),
                                        name=name, daemon=True)
        self._thread.start()

    def _put(self, instance: DicomInstance) -> None:
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
        if self._closed.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._closed.set()
            self._thread.join()
            if self._error is not None:
                raise self._error
            raise StopIteration
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
