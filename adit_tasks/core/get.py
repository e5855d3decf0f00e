"""C-GET: retrieve a study or selected series as a stream of instances, each exactly as stored.

C-GET needs no inbound port, so it is the first choice where a PACS supports it.

Syntax-exact retrieval. The PACS sends each instance on one of the presentation contexts we
proposed; when none has the syntax it stores, a transcoding PACS (Orthanc) converts the
instance (JPEG-LS near-lossless to Explicit VR Little Endian, say) and reports success. So a
SOP class is only ever offered "fully": one context per transfer syntax pydicom knows
(`TRANSFER_SYNTAXES`, uncompressed first: DCMTK `dcmqrscp` uses the first accepted context of
a class and fails the sub-operation when it cannot convert), and an instance counts as
delivered only when it arrived on a fully offered class. One association holds 126 storage
contexts, i.e. `FULL_CLASSES_PER_ASSOCIATION` (3) fully offered classes, so:

1. SOP classes known (from the caller's image-level C-FIND) and at most 3: one association,
   study- or series-level C-GET, as ever. The common case.
2. Otherwise the first association also lists the instances (an image-level C-FIND on the
   same association: SOP Instance UID, SOP class, series, and AvailableTransferSyntaxUID for
   PACS that say how they store an instance). The classes are grouped three by three; each
   group gets an association of its own, with series-level C-GETs for series made only of the
   group's classes and image-level C-GETs (lists of SOP Instance UIDs) for mixed series.
3. Where the PACS does not tell the classes (dcmqrscp lists no SOPClassUID), the first
   association offers CT and MR fully and as many other storage classes as fit uncompressed
   only (as before). An instance that arrives on such a partly offered class may have been
   converted: it is not delivered but fetched again by an image-level C-GET on an association
   that offers its (now known) class fully. Such PACS cost a second transfer of those
   instances; nothing converted is ever delivered as if it were the stored data.

Parallel associations. Where the node has spare slots (adit_tasks.core.association) and the
study is large enough (`MIN_PER_ASSOCIATION` instances per association), a round's requests
are shared by up to `max_associations` associations offering the same contexts: the caller's
list of instances (or the PACS's listing) is cut into whole series and, for a large series,
image-level UID lists (`split_requests`), about two per association, largest first, and each
association takes the next one when it is done. Measured on 2 cores (150-instance CT, see
docs/architecture.md): dcmqrscp (one process per association on its side) gains most; against
Orthanc, pynetdicom's PDU handling in one interpreter is the limit and two associations are
as fast as one. Processes instead of threads were measured too and lost (start-up).

Where the PACS lists an instance's AvailableTransferSyntaxUID, an instance that arrives in
another syntax is put aside (`Rejected`, a permanent failure of that instance with its
reason). A syntax pydicom does not know cannot be offered, and a PACS that stores one and
converts without saying so cannot be detected (no PACS here does). Instances that fail the
arrival checks (`DicomInstance.from_bytes`), belong to another study or series, or carry
another SOP class than their presentation context are put aside the same way.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID
from pynetdicom import Association, build_context, build_role, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from adit_tasks.core.association import MAX_CONTEXTS, Connection, SharedWork, run_shared
from adit_tasks.core.errors import AssociationError, IncompleteRetrieval, InvalidInstance, PacsBusy
from adit_tasks.core.instances import (
    STORAGE_SOP_CLASSES,
    TRANSFER_SYNTAXES,
    UNCOMPRESSED,
    DicomInstance,
    InstanceStream,
    Rejected,
    StreamClosed,
)
from adit_tasks.core.status import (
    SubOperations,
    check_retrieve_outcome,
    check_retrieve_status,
    check_status,
)

logger = logging.getLogger(__name__)

GET_MODEL = StudyRootQueryRetrieveInformationModelGet
FIND_MODEL = StudyRootQueryRetrieveInformationModelFind
# Two query/retrieve contexts (C-GET and C-FIND) leave 126 for storage: 3 classes x 39 syntaxes.
FULL_CLASSES_PER_ASSOCIATION = (MAX_CONTEXTS - 2) // len(TRANSFER_SYNTAXES)
UIDS_PER_REQUEST = 200  # SOP Instance UIDs in one image-level C-GET identifier
MIN_PER_ASSOCIATION = 20  # a smaller share is not worth opening another association

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
# Where the study's SOP classes are unknown, these are offered first (uncompressed only).
_COMMON_CLASSES = [
    CT_IMAGE,
    MR_IMAGE,
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray (presentation)
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography (presentation)
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
]


def full_contexts(sop_classes: Iterable[str]) -> list[PresentationContext]:
    """Each class with one context per transfer syntax: the PACS can always send as stored."""
    return [build_context(uid, ts) for uid in sop_classes for ts in TRANSFER_SYNTAXES]


def storage_contexts(full: Sequence[str], room: int, *, partial: bool = True
                     ) -> list[PresentationContext]:
    """`full` offered fully, then (if `partial`) other storage classes uncompressed only, as
    many as fit in `room` contexts."""
    contexts = full_contexts(full)
    if partial:
        others = [uid for uid in dict.fromkeys(_COMMON_CLASSES + STORAGE_SOP_CLASSES)
                  if uid not in full]
        contexts += [build_context(uid, UNCOMPRESSED) for uid in others]
    return contexts[:room]


def retrieve_identifier(study_uid: str, series_uid: str = "",
                        sop_instance_uids: Sequence[str] = ()) -> Dataset:
    """The C-GET/C-MOVE identifier of a study, one of its series, or instances of a series."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE" if sop_instance_uids else "SERIES" if series_uid else "STUDY"
    ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    if sop_instance_uids:
        ds.SOPInstanceUID = list(sop_instance_uids)
    return ds


def _valid_uids(values: Iterable[str]) -> list[str]:
    return sorted({v for v in values if v and UID(v, validation_mode=pydicom_config.IGNORE)
                   .is_valid})


@dataclass(frozen=True)
class CGet:
    """Retrieval by C-GET (see the module docstring)."""

    conn: Connection
    method: str = "c-get"

    def retrieve(self, study_uid: str, series_uids: tuple[str, ...] = (),
                 sop_classes: frozenset[str] = frozenset(),
                 instances: Mapping[str, str] | None = None) -> InstanceStream:
        return get_study(self.conn, study_uid, series_uids, sop_classes=sop_classes,
                         instances=instances)


# --- the instance listing (image-level C-FIND on the retrieval's first association) ----------


@dataclass
class Listing:
    """What the PACS lists for the study: per SOP Instance UID its series, class and (when the
    PACS says) the transfer syntaxes it holds the instance in."""

    series: dict[str, str] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)  # '' where the PACS did not say
    syntaxes: dict[str, frozenset[str]] = field(default_factory=dict)

    @property
    def classes_known(self) -> bool:
        return bool(self.classes) and all(self.classes.values())


def _raw_uids(ds: Dataset, keyword: str) -> list[str]:
    """The values of a UI attribute as sent, without pydicom's validation (whose warnings would
    print the value); malformed ones are left out."""
    elem = ds.get_item(tag_for_keyword(keyword))
    if elem is None or elem.value is None:
        return []
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    values = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    return _valid_uids(v.strip(" \0") for v in values)


def list_instances(conn: Connection, assoc: Association, study_uid: str,
                   series_uids: Sequence[str]) -> Listing:
    """Image-level C-FIND over `assoc` (it must have the Study Root FIND context)."""
    listing = Listing()
    for series_uid in series_uids or [""]:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        query.SOPInstanceUID = ""
        query.SOPClassUID = ""
        query.AvailableTransferSyntaxUID = ""
        for status, ds in assoc.send_c_find(query, FIND_MODEL):
            code = check_status(conn.node, "C-FIND", status)
            if code not in (0xFF00, 0xFF01) or ds is None:
                continue
            instance = _raw_uids(ds, "SOPInstanceUID")
            series = _raw_uids(ds, "SeriesInstanceUID") or ([series_uid] if series_uid else [])
            if len(instance) != 1 or len(series) != 1:
                continue  # nothing we could ask for by UID
            sop_class = _raw_uids(ds, "SOPClassUID")
            listing.series[instance[0]] = series[0]
            listing.classes[instance[0]] = sop_class[0] if len(sop_class) == 1 else ""
            syntaxes = _raw_uids(ds, "AvailableTransferSyntaxUID")
            if syntaxes:
                listing.syntaxes[instance[0]] = frozenset(syntaxes)
    return listing


# --- planning: which requests go over which association ---------------------------------------


@dataclass
class Round:
    """One association: the classes it offers fully and the C-GET requests sent over it."""

    full: tuple[str, ...]
    requests: list[Dataset]


def _requests(study_uid: str, members: dict[str, list[str]], wanted: set[str],
              level: str) -> list[Dataset]:
    """Requests for the `wanted` instances: with `level` STUDY, one study-level request when
    every listed instance is wanted; with STUDY or SERIES, series-level requests for wholly
    wanted series; image-level requests (chunked lists) for the rest."""
    if level == "STUDY" and all(uid in wanted for uids in members.values() for uid in uids):
        return [retrieve_identifier(study_uid)]
    requests = []
    for series_uid, uids in members.items():
        chosen = [uid for uid in uids if uid in wanted]
        if not chosen:
            continue
        if level != "IMAGE" and len(chosen) == len(uids):
            requests.append(retrieve_identifier(study_uid, series_uid))
            continue
        for start in range(0, len(chosen), UIDS_PER_REQUEST):
            requests.append(retrieve_identifier(study_uid, series_uid,
                                                chosen[start:start + UIDS_PER_REQUEST]))
    return requests


def plan_rounds(study_uid: str, classes: dict[str, str], series: dict[str, str],
                first: Sequence[str], level: str) -> list[Round]:
    """Rounds for instances of known classes (`classes` and `series` by SOP Instance UID, all
    the instances of the study, or of its series asked for, unless `level` is IMAGE): the
    first round offers the classes of `first` that occur (it reuses the first association),
    then the others three by three, most frequent first."""
    counts = Counter(classes.values())
    head = tuple(c for c in first if c in counts)
    rest = [c for c, _ in counts.most_common() if c not in head]
    n = FULL_CLASSES_PER_ASSOCIATION
    groups = ([head] if head else []) + [tuple(rest[i:i + n]) for i in range(0, len(rest), n)]
    members: dict[str, list[str]] = {}
    for uid in sorted(classes):
        members.setdefault(series[uid], []).append(uid)
    rounds = []
    for group in groups:
        wanted = {uid for uid, c in classes.items() if c in group}
        rounds.append(Round(group, _requests(study_uid, members, wanted, level)))
    return rounds


# --- receiving --------------------------------------------------------------------------------


class _Receiving:
    """The C-STORE side of a C-GET: checks each instance and hands it to the stream."""

    def __init__(self, study_uid: str, series_uids: Sequence[str],
                 put: Callable[[DicomInstance | Rejected], None]) -> None:
        self.study_uid = study_uid
        self.series_uids = set(series_uids)
        self.put = put
        self.full: frozenset[str] = frozenset()  # classes the current association offers fully
        self.listed_syntaxes: dict[str, frozenset[str]] = {}
        self.received = 0  # every instance the PACS sent (its sub-operations)
        self.arrived: set[str] = set()  # SOP Instance UIDs that arrived at all
        self.delivered: set[str] = set()
        self.deferred: dict[str, tuple[str, str]] = {}  # uid -> (series, class): fetch again
        self.rejected = 0
        self.unreadable = 0  # rejected before their SOP Instance UID was known
        self._lock = threading.Lock()

    def _check(self, event: evt.Event, data: bytes) -> DicomInstance | Rejected | None:
        """The instance to deliver, Rejected, or None when it is to be fetched again (or
        came before)."""
        try:
            instance = DicomInstance.from_bytes(data)
        except InvalidInstance as exc:
            with self._lock:
                self.unreadable += 1
            return Rejected(str(exc))
        uid = instance.sop_instance_uid
        with self._lock:  # parallel associations deliver into the same books
            self.arrived.add(uid)
            if instance.study_uid != self.study_uid or (
                    self.series_uids and instance.series_uid not in self.series_uids):
                return Rejected("an instance of another study or series than the one asked for")
            if instance.sop_class_uid != event.context.abstract_syntax:
                return Rejected("the SOP class differs from the presentation context it came on")
            listed = self.listed_syntaxes.get(uid)
            if listed and instance.transfer_syntax_uid not in listed:
                return Rejected(
                    f"arrived in {instance.transfer_syntax.name}, though the server lists it as "
                    "stored in another transfer syntax (converted on the way)")
            if uid in self.delivered:
                return None  # it came in its stored syntax before
            if instance.sop_class_uid not in self.full:
                # Its class was offered in some syntaxes only: the PACS may have converted it.
                self.deferred[uid] = (instance.series_uid, instance.sop_class_uid)
                return None
            self.deferred.pop(uid, None)
            self.delivered.add(uid)
            return instance

    def on_store(self, event: evt.Event) -> int:
        item = self._check(event, event.encoded_dataset())
        try:
            if isinstance(item, Rejected):
                with self._lock:
                    self.rejected += 1
                self.put(item)
            elif item is not None:
                self.put(item)
        except StreamClosed:
            # The consumer is gone: stop the PACS sending more. Without the zero timeout
            # pynetdicom would wait a full DIMSE timeout for a message after the abort.
            event.assoc.dimse_timeout = 0
            event.assoc.abort()
            raise
        with self._lock:
            self.received += 1
        return 0x0000


def split_requests(study_uid: str, instances: Mapping[str, str], parts: int) -> list[Dataset]:
    """Requests for these instances (SOP Instance UID -> series) in about `parts` shares,
    largest first: a series that fits in a share is asked for whole, a larger one as
    image-level lists of UIDs."""
    members: dict[str, list[str]] = {}
    for uid, series_uid in sorted(instances.items()):
        members.setdefault(series_uid, []).append(uid)
    share = min(max(1, -(-len(instances) // parts)), UIDS_PER_REQUEST)
    sized: list[tuple[int, Dataset]] = []
    for series_uid, uids in members.items():
        if len(uids) <= share:
            sized.append((len(uids), retrieve_identifier(study_uid, series_uid)))
            continue
        for start in range(0, len(uids), share):
            chunk = uids[start:start + share]
            sized.append((len(chunk), retrieve_identifier(study_uid, series_uid, chunk)))
    return [request for _, request in sorted(sized, key=lambda item: -item[0])]


def get_study(
    conn: Connection,
    study_uid: str,
    series_uids: Iterable[str] = (),
    *,
    sop_classes: Iterable[str] | None = None,
    instances: Mapping[str, str] | None = None,
) -> InstanceStream:
    """Stream the instances of a study (or of the given series) by C-GET, each in the syntax
    the PACS stores it in (see the module docstring). `instances` (SOP Instance UID -> series
    UID, from the caller's image-level C-FIND) lets a large study be shared by parallel
    associations."""
    series = list(series_uids)
    known = _valid_uids(sop_classes or ())
    single = 0 < len(known) <= FULL_CLASSES_PER_ASSOCIATION
    first_full = tuple(known if single else known[:FULL_CLASSES_PER_ASSOCIATION]
                       or (CT_IMAGE, MR_IMAGE))
    listed = {uid: s for uid, s in (instances or {}).items() if not series or s in series}
    if not all(listed.values()):
        listed = {}  # an image-level C-GET names the series: split only what has one

    def produce(put: Callable[[DicomInstance | Rejected], None]) -> None:
        receiving = _Receiving(study_uid, series, put)
        total = SubOperations()
        lock = threading.Lock()

        def run(assoc: Association, requests: Iterable[Dataset]) -> None:
            nonlocal total
            for identifier in requests:
                subops = SubOperations()
                for status, _ in assoc.send_c_get(identifier, GET_MODEL):
                    if status:
                        subops.update(status)
                    check_retrieve_status(conn.node, "C-GET", status, receiving.received,
                                          subops)
                with lock:
                    total += subops

        def associate(full: Sequence[str], *, find: bool = False, partial: bool = False,
                      via: Connection = conn):
            models = [build_context(GET_MODEL)] + ([build_context(FIND_MODEL)] if find else [])
            contexts = models + storage_contexts(full, MAX_CONTEXTS - len(models),
                                                 partial=partial)
            roles = [build_role(uid, scp_role=True)
                     for uid in dict.fromkeys(cx.abstract_syntax for cx in contexts[len(models):])]
            return via.associate(contexts, ext_neg=roles,
                                 evt_handlers=[(evt.EVT_C_STORE, receiving.on_store)])

        def run_round(assoc: Association, round_: Round, members: Mapping[str, str],
                      *, size: int = 0, partial: bool = False) -> None:
            """The round's requests over `assoc` and as many more associations (offering the
            same contexts) as spare slots allow. `members` (instance -> series) lets large
            whole-study or whole-series requests be split; without them, the round's own
            requests (for `size` instances) are shared as they are."""
            receiving.full = frozenset(round_.full)
            shares = (len(members) if members else size) // MIN_PER_ASSOCIATION
            if not members:
                shares = min(shares, len(round_.requests))
            wanted = min(conn.node.max_associations, shares)
            if wanted <= 1:
                run(assoc, round_.requests)
                return
            with conn.spare_connections(wanted - 1) as spares:
                requests = round_.requests
                if spares and members:
                    requests = split_requests(study_uid, members, 2 * (1 + len(spares)))
                work = SharedWork(requests)

                def extra(via: Connection) -> None:
                    with contextlib.ExitStack() as stack:
                        try:
                            more = stack.enter_context(associate(round_.full, partial=partial,
                                                                 via=via))
                        except (AssociationError, PacsBusy) as exc:
                            # The node refused one more association: the others do its share.
                            logger.info("%s: a parallel association failed (%s); going on "
                                        "with fewer", conn.node.name, type(exc).__name__)
                            return
                        run(more, work)

                if spares:
                    logger.info("%s: C-GET over %d associations", conn.node.name,
                                1 + len(spares))
                run_shared(work, lambda: run(assoc, work),
                           [lambda via=via: extra(via) for via in spares],
                           name=f"c-get-{conn.node.name}")

        def in_round(round_: Round) -> int:
            """How many listed instances the round fetches."""
            classes = listing.classes.values() if listing is not None else ()
            return sum(1 for c in classes if c in round_.full)

        whole = [retrieve_identifier(study_uid, s) for s in series or [""]]
        listing: Listing | None = None
        rounds: list[Round] = []
        with associate(first_full, find=not single, partial=not single) as assoc:
            if single:
                run_round(assoc, Round(first_full, whole), listed)
            else:
                if any(cx.abstract_syntax == FIND_MODEL for cx in assoc.accepted_contexts):
                    listing = list_instances(conn, assoc, study_uid, series)
                    receiving.listed_syntaxes = listing.syntaxes
                if listing is not None and listing.classes_known:
                    rounds = plan_rounds(study_uid, listing.classes, listing.series,
                                         first_full, "SERIES" if series else "STUDY")
                    if len(rounds) > 1:
                        logger.info("%s: %d SOP classes need %d associations to be offered "
                                    "in every transfer syntax", conn.node.name,
                                    len(set(listing.classes.values())), len(rounds))
                    if rounds and set(rounds[0].full) <= set(first_full):
                        first = rounds.pop(0)
                        run_round(assoc, first, {}, size=in_round(first))
                else:  # classes unknown: see step 3
                    members = listing.series if listing is not None and listing.series else listed
                    run_round(assoc, Round(first_full, whole), members, partial=True)
        for round_ in rounds:
            with associate(round_.full) as assoc:
                run_round(assoc, round_, {}, size=in_round(round_))
        if receiving.deferred:
            deferred = dict(receiving.deferred)
            logger.info("%s: %d instances arrived in a SOP class not offered in every transfer "
                        "syntax; fetching them again so they arrive as stored",
                        conn.node.name, len(deferred))
            again = plan_rounds(study_uid, {u: c for u, (_, c) in deferred.items()},
                                {u: s for u, (s, _) in deferred.items()}, (), "IMAGE")
            for round_ in again:
                with associate(round_.full) as assoc:
                    receiving.full = frozenset(round_.full)
                    run(assoc, round_.requests)
        check_retrieve_outcome(conn.node, "C-GET", receiving.received, total)
        missing = set(receiving.deferred)
        if listing is not None and listing.classes_known:
            missing |= set(listing.classes) - receiving.arrived
        if len(missing) > receiving.unreadable:  # an unreadable one may be one of them
            raise IncompleteRetrieval(
                f"{conn.node.name}: C-GET did not deliver {len(missing)} instances asked for "
                "by SOP Instance UID", expected=receiving.received + len(missing),
                received=receiving.received)
        logger.info("%s: C-GET delivered %d instances%s", conn.node.name,
                    len(receiving.delivered),
                    f" ({receiving.rejected} put aside)" if receiving.rejected else "")

    return InstanceStream(produce, name=f"c-get-{conn.node.name}")
