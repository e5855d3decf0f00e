"""DICOMweb: WADO-RS retrieval as a stream of instances.

We ask for `transfer-syntax=*` so the server sends each instance in the syntax it stores, and
parse the multipart/related response incrementally: memory holds one instance at a time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import httpx
from pydicom.config import IGNORE
from pydicom.uid import UID

from adit_tasks.core.association import Connection, SlotFactory, local_slot
from adit_tasks.core.config import ServerNode
from adit_tasks.core.errors import (
    AssociationError,
    DimseTimeout,
    InvalidInstance,
    NotSupported,
    OperationFailed,
    StudyNotFound,
)
from adit_tasks.core.instances import DicomInstance, InstanceStream, Rejected
from adit_tasks.core.status import check_http_status

logger = logging.getLogger(__name__)

ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


MAX_PART_BYTES = 4 << 30  # larger than any instance we expect; bounds a hostile stream


def iter_multipart(chunks: Iterable[bytes], boundary: bytes, *,
                   max_part: int = MAX_PART_BYTES) -> Iterator[bytes]:
    """The bodies of a multipart/related stream, one part at a time (RFC 2046 5.1).

    Memory holds one part and one chunk; each chunk is searched once (a 50 MB multi-frame
    part arriving in 1 MB chunks is not scanned again from its start for every chunk). A
    part that grows past `max_part` without its delimiter is InvalidInstance: a server that
    never sends one must not fill the memory."""
    delimiter = b"\r\n--" + boundary
    buffer = bytearray(b"\r\n")  # lets the first delimiter match like the others
    searched = 0  # no delimiter starts before this offset of the buffer
    in_part = False
    for chunk in chunks:
        buffer += chunk
        while True:
            pos = buffer.find(delimiter, searched)
            if pos < 0:
                searched = max(0, len(buffer) - len(delimiter) + 1)
                if len(buffer) > max_part + len(delimiter):
                    raise InvalidInstance(f"a WADO-RS part exceeds {max_part} bytes without "
                                          "its multipart delimiter")
                break
            if in_part:
                header_end = buffer.find(b"\r\n\r\n", 0, pos)
                with memoryview(buffer) as view:  # one copy of the body, not two
                    body = bytes(view[header_end + 4 if header_end >= 0 else 0:pos])
                yield body
            del buffer[: pos + len(delimiter)]
            searched = 0
            if buffer[:2] == b"--":  # closing delimiter
                return
            in_part = True
            if len(buffer) < 2:
                break


def _boundary(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not match:
        raise OperationFailed(f"WADO-RS answer is not multipart: {content_type!r}")
    return match.group(1).encode()


@dataclass(frozen=True)
class WadoRs:
    """Retrieval by WADO-RS from the node's `dicomweb_url`, inside the connection's slot."""

    conn: Connection
    method: str = "wado-rs"

    def retrieve(self, study_uid: str, series_uids: tuple[str, ...] = (),
                 sop_classes: frozenset[str] = frozenset(),
                 instances: Mapping[str, str] | None = None) -> InstanceStream:
        return wado_study(self.conn.node, study_uid, series_uids, slot=self.conn.slot)


def _checked(body: bytes, study_uid: str, series: list[str]) -> DicomInstance | Rejected:
    """One multipart part as an instance of the study (and series) asked for, or Rejected."""
    try:
        instance = DicomInstance.from_bytes(body)
    except InvalidInstance as exc:
        return Rejected(str(exc))
    if instance.study_uid != study_uid or (series and instance.series_uid not in series):
        return Rejected("an instance of another study or series than the one asked for")
    return instance


def wado_study(
    node: ServerNode,
    study_uid: str,
    series_uids: Iterable[str] = (),
    *,
    slot: SlotFactory = local_slot,
    client: httpx.Client | None = None,
) -> InstanceStream:
    """Stream the instances of a study (or of the given series) by WADO-RS."""
    if not node.dicomweb_url:
        raise NotSupported(f"node '{node.name}' has no dicomweb_url for WADO-RS")
    series = list(series_uids)
    base = f"{node.dicomweb_url}/studies/{study_uid}"
    urls = [f"{base}/series/{s}" for s in series] or [base]

    def produce(put: Callable[[DicomInstance], None]) -> None:
        http = client or httpx.Client(timeout=httpx.Timeout(node.timeout))
        try:
            with slot(node):
                for url in urls:
                    received = 0
                    try:
                        with http.stream("GET", url, headers={"Accept": ACCEPT}) as response:
                            check_http_status(node, response.status_code, "WADO-RS study")
                            boundary = _boundary(response.headers.get("content-type", ""))
                            for body in iter_multipart(response.iter_bytes(1 << 20), boundary):
                                put(_checked(body, study_uid, series))
                                received += 1
                    except httpx.TimeoutException as exc:
                        raise DimseTimeout(f"{node.name}: WADO-RS timed out") from exc
                    except httpx.TransportError as exc:
                        raise AssociationError(f"{node.name}: WADO-RS failed: {exc}") from exc
                    if received == 0:
                        raise StudyNotFound(f"{node.name}: WADO-RS returned no instances")
                    logger.info("%s: WADO-RS delivered %d instances", node.name, received)
        finally:
            if client is None:
                http.close()

    return InstanceStream(produce, name=f"wado-{node.name}")


def qido_instance_uids(node: ServerNode, study_uid: str, *, slot: SlotFactory = local_slot,
                       client: httpx.Client | None = None) -> set[str]:
    """SOPInstanceUIDs a DICOMweb server holds for a study (QIDO-RS); empty if none."""
    if not node.dicomweb_url:
        raise NotSupported(f"node '{node.name}' has no dicomweb_url for QIDO-RS")
    http = client or httpx.Client(timeout=httpx.Timeout(node.timeout))
    try:
        with slot(node):
            response = http.get(f"{node.dicomweb_url}/studies/{study_uid}/instances",
                                headers={"Accept": "application/dicom+json"})
    except httpx.TransportError as exc:
        raise AssociationError(f"{node.name}: QIDO-RS failed: {exc}") from exc
    finally:
        if client is None:
            http.close()
    if response.status_code in (204, 404):
        return set()
    check_http_status(node, response.status_code, "QIDO-RS instances")
    try:
        body = response.json()
    except ValueError:
        raise OperationFailed(f"{node.name}: QIDO-RS answer is not JSON") from None
    if not isinstance(body, list):
        raise OperationFailed(f"{node.name}: QIDO-RS answer is not a list of instances")
    return _json_uids(body, "00080018")


STOW_BATCH_BYTES = 64 * 1024 * 1024  # per request: bounded memory, few round trips


def stow_instances(node: ServerNode, instances: Iterable[DicomInstance], *,
                   slot: SlotFactory = local_slot,
                   client: httpx.Client | None = None) -> list[str]:
    """STOW-RS the instances in batches; returns the SOPInstanceUIDs the server accepted."""
    if not node.dicomweb_url:
        raise NotSupported(f"node '{node.name}' has no dicomweb_url for STOW-RS")
    boundary = "adit-stow-boundary-7f3a"
    stored: list[str] = []
    http = client or httpx.Client(timeout=httpx.Timeout(node.timeout))

    def send(batch: list[DicomInstance]) -> None:
        body = bytearray()
        for instance in batch:
            body += (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").encode()
            body += instance.data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
        try:
            response = http.post(f"{node.dicomweb_url}/studies", content=bytes(body),
                                 headers={"Content-Type": content_type,
                                          "Accept": "application/dicom+json"})
        except httpx.TransportError as exc:
            raise AssociationError(f"{node.name}: STOW-RS failed: {exc}") from exc
        check_http_status(node, response.status_code, "STOW-RS")
        failed = _stow_failures(response)
        stored.extend(i.sop_instance_uid for i in batch if i.sop_instance_uid not in failed)

    try:
        with slot(node):
            batch: list[DicomInstance] = []
            size = 0
            for instance in instances:
                batch.append(instance)
                size += len(instance.data)
                if size >= STOW_BATCH_BYTES:
                    send(batch)
                    batch, size = [], 0
            if batch:
                send(batch)
    finally:
        if client is None:
            http.close()
    return stored


def _stow_failures(response: httpx.Response) -> set[str]:
    """SOPInstanceUIDs listed in the FailedSOPSequence (0008,1198) of a STOW-RS response."""
    try:
        body = response.json()
    except ValueError:
        return set()
    failed = body.get("00081198") if isinstance(body, dict) else None
    items = failed.get("Value") if isinstance(failed, dict) else None
    return _json_uids(items if isinstance(items, list) else [], "00081155")


def _json_uids(items: list[object], tag: str) -> set[str]:
    """The well-formed UIDs of one attribute in DICOM JSON items (PS3.18 F.2); malformed
    entries are left out, so a hostile answer cannot put a value into a path or a query."""
    uids = set()
    for item in items:
        element = item.get(tag) if isinstance(item, dict) else None
        values = element.get("Value") if isinstance(element, dict) else None
        value = values[0] if isinstance(values, list) and values else None
        if isinstance(value, str) and UID(value, validation_mode=IGNORE).is_valid:
            uids.add(value)
    return uids
