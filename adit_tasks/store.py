"""C-STORE: send a stream of instances to a DICOM server over one association.

A stream does not say up front which SOP classes and transfer syntaxes it will carry, so the
association is opened for what the first instance needs, and reopened with the union whenever
an instance needs a (SOP class, transfer syntax) pair the server has not accepted yet. Most
studies need one or two associations. Each instance is sent in its own transfer syntax; a
server that does not accept it gets it in an uncompressed syntax only if the instance is
uncompressed (lossless re-encoding), otherwise the instance is reported as failed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import Association, build_context

from adit_tasks.association import Connection, check_status
from adit_tasks.errors import OperationFailed, PacsBusy
from adit_tasks.instances import DicomInstance

logger = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128


@dataclass
class StoreResult:
    """What a C-STORE of a stream achieved."""

    stored: list[str] = field(default_factory=list)  # SOPInstanceUIDs
    failed: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def _contexts(pairs: set[tuple[str, str]]) -> list:
    by_class: dict[str, set[str]] = {}
    for sop_class, ts in pairs:
        by_class.setdefault(sop_class, set()).add(ts)
    contexts = []
    for sop_class, syntaxes in sorted(by_class.items()):
        # One context per syntax, so the server accepts or refuses each one on its own.
        for ts in sorted(syntaxes | set(_UNCOMPRESSED)):
            contexts.append(build_context(sop_class, ts))
    return contexts[:MAX_CONTEXTS]


def _accepts(assoc: Association, instance: DicomInstance) -> bool:
    wanted = {instance.transfer_syntax_uid}
    if instance.transfer_syntax_uid in _UNCOMPRESSED:
        wanted = set(_UNCOMPRESSED)
    return any(
        cx.abstract_syntax == instance.sop_class_uid and cx.transfer_syntax[0] in wanted
        for cx in assoc.accepted_contexts
    )


def store_instances(conn: Connection, instances: Iterable[DicomInstance]) -> StoreResult:
    """C-STORE every instance of the stream; failures are collected per instance."""
    result = StoreResult()
    pairs: set[tuple[str, str]] = set()
    tried: set[tuple[str, str]] = set()
    it: Iterator[DicomInstance] = iter(instances)
    pending: DicomInstance | None = next(it, None)
    while pending is not None:
        pairs.add((pending.sop_class_uid, pending.transfer_syntax_uid))
        with conn.associate(_contexts(pairs)) as assoc:
            tried |= pairs
            while pending is not None:
                key = (pending.sop_class_uid, pending.transfer_syntax_uid)
                if not _accepts(assoc, pending):
                    if key not in tried:
                        break  # reopen with this pair added
                    result.failed[pending.sop_instance_uid] = (
                        f"{conn.node.name} accepts neither SOP class {pending.sop_class_uid} "
                        f"in transfer syntax {pending.transfer_syntax_uid} nor uncompressed"
                    )
                else:
                    _store_one(conn, assoc, pending, result)
                pending = next(it, None)
    return result


def _store_one(conn: Connection, assoc: Association, instance: DicomInstance,
               result: StoreResult) -> None:
    try:
        status = assoc.send_c_store(instance.dataset)
        code = check_status(conn.node, "C-STORE", status)
    except PacsBusy:
        raise  # the whole study is retried later
    except (OperationFailed, ValueError) as exc:
        result.failed[instance.sop_instance_uid] = str(exc)
        return
    if code != 0x0000:
        result.warnings[instance.sop_instance_uid] = f"C-STORE warning 0x{code:04X}"
    result.stored.append(instance.sop_instance_uid)
    instance.__dict__.pop("dataset", None)  # free the parsed copy; the stream moves on
