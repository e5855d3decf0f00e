"""C-STORE: send a stream of instances to a DICOM server, each in its own transfer syntax.

A stream does not say up front which SOP classes and transfer syntaxes it will carry. The
next instances (up to `LOOKAHEAD` of them, `LOOKAHEAD_BYTES` at most) are looked at before an
association is opened, and it is opened for their (SOP class, transfer syntax) pairs plus the
pairs used before, as many as fit in 128 presentation contexts. When an instance needs a pair
the association was not opened for, it is released and the next one opened, so any number of
pairs goes through, over as many associations as needed; most studies need one.

Each pair gets a context of its own, so the server accepts or refuses each one on its own. An
instance is sent in the syntax it arrived in; an uncompressed one (Explicit or Implicit VR
Little Endian) may be re-encoded losslessly into the other if the server takes only that one.
Nothing else is converted: an instance whose pair the server refused is recorded as refused.

Outcomes per instance (`StoreResult`): stored; refused for good (`refused`: a failure status
other than 'out of resources', with the status code and the server's comment, or a pair the
server did not accept) - retrying cannot help, the transfer fails with `DestinationRefused`;
'out of resources' (0xA7xx) raises PacsBusy, and no response DimseTimeout: the whole study is
retried later.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import Association, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from adit_tasks.core.association import MAX_CONTEXTS, Connection
from adit_tasks.core.errors import DestinationRefused
from adit_tasks.core.instances import UNCOMPRESSED, DicomInstance
from adit_tasks.core.status import check_store_status

logger = logging.getLogger(__name__)

LOOKAHEAD = 32  # instances looked at before an association is opened
LOOKAHEAD_BYTES = 64 * 1024 * 1024

Pair = tuple[str, str]  # (SOP class UID, transfer syntax UID)


@dataclass
class StoreResult:
    """What storing a stream achieved.

    `failed` holds every instance that was not stored, with its reason; `refused` the subset
    the destination refused for good (permanent: the same instance would be refused again).
    Reasons name status codes, SOP classes and syntaxes, never an instance.
    """

    stored: list[str] = field(default_factory=list)  # SOPInstanceUIDs
    failed: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason
    refused: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason
    # Said about the study, not a failure (e.g. a series not converted to NIfTI, and why).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def permanent(self) -> bool:
        """True when the destination refused instances for good."""
        return bool(self.refused)

    def refuse(self, uid: str, reason: str) -> None:
        self.refused[uid] = self.failed[uid] = reason

    def summary(self) -> str:
        """'refused 3 instances: 0xA900 Data Set Does Not Match SOP Class (3)', most frequent
        reason first; '' when nothing was refused."""
        if not self.refused:
            return ""
        counts = Counter(self.refused.values()).most_common()
        reasons = "; ".join(f"{reason} ({n})" for reason, n in counts)
        n = len(self.refused)
        return f"refused {n} instance{'s' if n != 1 else ''}: {reasons}"

    def error(self, destination: str) -> DestinationRefused | None:
        """The permanent error for the study, or None when nothing was refused."""
        if not self.refused:
            return None
        return DestinationRefused(f"{destination} {self.summary()}", reason=self.summary())


def _pair(instance: DicomInstance) -> Pair:
    return instance.sop_class_uid, instance.transfer_syntax_uid


def _pair_contexts(pair: Pair) -> list:
    """One context per syntax the pair may be sent in: its own, and for Explicit/Implicit VR
    Little Endian also the other one (lossless re-encoding)."""
    sop_class, ts = pair
    syntaxes = UNCOMPRESSED if ts in UNCOMPRESSED else [ts]
    return [build_context(sop_class, s) for s in syntaxes]


def _contexts(pairs: Iterable[Pair]) -> tuple[list, list[Pair]]:
    """Contexts for as many of `pairs` (in order) as fit; and the pairs they cover."""
    contexts: list = []
    seen: set[tuple[str, str]] = set()
    covered: list[Pair] = []
    for pair in pairs:
        new = [cx for cx in _pair_contexts(pair)
               if (cx.abstract_syntax, cx.transfer_syntax[0]) not in seen]
        if len(contexts) + len(new) > MAX_CONTEXTS:
            continue
        contexts += new
        seen |= {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in new}
        covered.append(pair)
    return contexts, covered


def _accepts(assoc: Association, instance: DicomInstance) -> bool:
    wanted = {instance.transfer_syntax_uid}
    if instance.transfer_syntax_uid in UNCOMPRESSED:
        wanted = set(UNCOMPRESSED)
    return any(
        cx.abstract_syntax == instance.sop_class_uid and cx.transfer_syntax[0] in wanted
        for cx in assoc.accepted_contexts
    )


def _not_accepted(pair: Pair) -> str:
    sop_class, ts = pair
    also = " (nor the other uncompressed syntax)" if ts in UNCOMPRESSED else ""
    return (f"presentation context rejected: {UID(sop_class).name} in {UID(ts).name}"
            f"{also} not accepted")


def store_instances(conn: Connection, instances: Iterable[DicomInstance]) -> StoreResult:
    """C-STORE every instance of the stream (see the module docstring)."""
    result = StoreResult()
    it: Iterator[DicomInstance] = iter(instances)
    ahead: deque[DicomInstance] = deque()
    used: list[Pair] = []  # pairs proposed before, most recent last
    tried: set[Pair] = set()  # pairs proposed at least once (refused pairs stay refused)
    refused_pairs: set[Pair] = set()
    associations = 0

    def look_ahead() -> None:
        size = sum(len(i.data) for i in ahead)
        while len(ahead) < LOOKAHEAD and size < LOOKAHEAD_BYTES:
            instance = next(it, None)
            if instance is None:
                return
            ahead.append(instance)
            size += len(instance.data)

    look_ahead()
    while ahead:
        look_ahead()
        wanted = [p for p in dict.fromkeys(_pair(i) for i in ahead) if p not in refused_pairs]
        if not wanted:  # every instance ahead needs a pair the server refused
            instance = ahead.popleft()
            result.refuse(instance.sop_instance_uid, _not_accepted(_pair(instance)))
            look_ahead()
            continue
        before = [p for p in reversed(used) if p not in wanted and p not in refused_pairs]
        contexts, covered = _contexts(wanted + before)
        associations += 1
        with conn.associate(contexts) as assoc, _reactor_paused(assoc):
            tried |= set(covered)
            used = [p for p in used if p not in covered] + covered
            for pair in covered:
                if not any(_accepts_pair(assoc, pair, s) for s in _syntaxes(pair)):
                    refused_pairs.add(pair)
            while ahead:
                instance = ahead[0]
                pair = _pair(instance)
                if pair in refused_pairs:
                    result.refuse(instance.sop_instance_uid, _not_accepted(pair))
                elif _accepts(assoc, instance):
                    _store_one(conn, assoc, instance, result)
                else:
                    break  # a pair this association was not opened for: open the next one
                ahead.popleft()
                if not ahead:
                    look_ahead()
    if associations > 1:
        logger.info("%s: C-STORE used %d associations for %d SOP class / transfer syntax "
                    "pairs", conn.node.name, associations, len(tried))
    logger.info("%s: C-STORE stored %d instances, %d refused", conn.node.name,
                len(result.stored), len(result.failed))
    return result


def _syntaxes(pair: Pair) -> list[str]:
    return UNCOMPRESSED if pair[1] in UNCOMPRESSED else [pair[1]]


def _accepts_pair(assoc: Association, pair: Pair, syntax: str) -> bool:
    return any(cx.abstract_syntax == pair[0] and cx.transfer_syntax[0] == syntax
               for cx in assoc.accepted_contexts)


def dataset_offset(data: bytes) -> int | None:
    """Where the data set starts in Part 10 bytes (after preamble and file meta), if the file
    meta starts with its group length as pydicom and pynetdicom write it."""
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


@contextlib.contextmanager
def _reactor_paused(assoc: Association) -> Iterator[None]:
    """Keep pynetdicom's reactor thread away from the association's messages while we send
    C-STOREs and read their responses ourselves (what send_c_store does per message).

    Pausing once per association, not per message: re-pausing right after a resume can see
    the reactor's stale "paused" flag, and then the reactor takes our response (seen as
    "Received unexpected C-STORE service message" and a DIMSE timeout).
    """
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def _payload(assoc: Association, instance: DicomInstance) -> tuple[int, bytes]:
    """(context ID, data set bytes): the received bytes as they are when the server accepted
    their syntax; else re-encoded losslessly into the accepted uncompressed syntax."""
    offset = dataset_offset(instance.data)
    for cx in assoc.accepted_contexts:
        if (cx.abstract_syntax == instance.sop_class_uid
                and cx.transfer_syntax[0] == instance.transfer_syntax_uid
                and offset is not None):
            return cx.context_id, instance.data[offset:]
    for cx in assoc.accepted_contexts:
        ts = UID(cx.transfer_syntax[0])
        if cx.abstract_syntax == instance.sop_class_uid and ts in UNCOMPRESSED:
            encoded = encode(instance.dataset, ts.is_implicit_VR, ts.is_little_endian)
            if encoded is None:
                raise ValueError("the instance could not be encoded")
            return cx.context_id, encoded
    raise ValueError("no accepted presentation context for the instance")


def _send(assoc: Association, instance: DicomInstance) -> Dataset | None:
    """One C-STORE request and its response, with the reactor paused (_reactor_paused).

    Sends the data set bytes as received, without decoding and re-encoding them
    (pynetdicom's send_c_store takes a Dataset or a file path only); saves ~1.5-2 ms per
    instance (benchmarks/transfer.py).
    """
    context_id, payload = _payload(assoc, instance)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = instance.sop_class_uid
    req.AffectedSOPInstanceUID = instance.sop_instance_uid
    req.Priority = 2
    req.DataSet = io.BytesIO(payload)
    assoc.dimse.send_msg(req, context_id)
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None:
        assoc._handle_no_response()
        return None
    return assoc._check_received_status(rsp)


def _store_one(conn: Connection, assoc: Association, instance: DicomInstance,
               result: StoreResult) -> None:
    """Store one instance; a refusal is recorded, PacsBusy and DimseTimeout propagate (the
    whole study is retried later)."""
    try:
        code = check_store_status(conn.node, _send(assoc, instance))
    except DestinationRefused as exc:
        result.refuse(instance.sop_instance_uid, exc.reason)
        return
    except ValueError as exc:
        result.failed[instance.sop_instance_uid] = str(exc)
        return
    if code != 0x0000:
        logger.info("%s: C-STORE warning 0x%04X", conn.node.name, code)
    result.stored.append(instance.sop_instance_uid)
    instance.__dict__.pop("dataset", None)  # free a parsed copy, if one was made
