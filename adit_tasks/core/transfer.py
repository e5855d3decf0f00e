"""One study from a source server to a sink, pseudonymized on the way if asked, verified.

Plain Python: the Prefect task in `adit_tasks.tasks` adds retries, names and slots around it.
Steps (docs/architecture.md): resolve the study and the instances to expect (C-FIND), work out
what the destination must end up holding (pseudonymized UIDs are deterministic, so this is
known before anything moves), skip the study if it is all there, otherwise retrieve as a
stream, leave out what the destination already has, pseudonymize, write, and count again at
the destination.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adit_tasks.core.errors import (
    IncompleteRetrieval,
    InvalidData,
    StudyNotFound,
)
from adit_tasks.core.find import Query, Study, find_studies, manifest
from adit_tasks.core.folder import safe_component, unique_component
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.plan import TransferPlan
from adit_tasks.core.pseudonymize import BurnedInAnnotation, LeakFound, Pseudonymizer
from adit_tasks.core.results import StudyJob
from adit_tasks.core.sinks import StudyTarget

logger = logging.getLogger(__name__)

@dataclass
class StudyOutcome:
    """What moving one study achieved (a failure is raised, never returned)."""

    status: Literal["success", "warning"]
    expected: int
    transferred: int
    skipped: int = 0
    message: str = ""
    pseudonym: str = ""
    destination_study_uid: str = ""


@dataclass
class Pseudonymization:
    """How one study is pseudonymized: the pseudonymizer and the pseudonym (None: derived)."""

    pseudonymizer: Pseudonymizer
    pseudonym: str | None = None


@dataclass
class _Counts:
    burned_in: set[str] = field(default_factory=set)  # destination UIDs left out
    withheld: dict[str, str] = field(default_factory=dict)  # failed the leak check: UID -> why
    unlisted: int = 0  # instances the source's C-FIND did not list

    @property
    def left_out(self) -> set[str]:
        """Destination UIDs not sent on purpose."""
        return self.burned_in | set(self.withheld)


def study_target(study: Study, pseudo: Pseudonymization | None) -> tuple[StudyTarget, str]:
    """Where the study will live at the destination, and the pseudonym used ('' if none).

    The folder name is stable (nothing that changes when a study grows, such as its
    modalities) and unique (a digest of the StudyInstanceUID, or the new UID when
    pseudonymizing; identifiers that had to be changed to be safe get a digest too).
    """
    if pseudo is None:
        digest = hashlib.sha256(study.StudyInstanceUID.encode()).hexdigest()[:8]
        folder = Path(unique_component(study.PatientID, "nopatient")) / "-".join([
            safe_component(study.StudyDate, "nodate"),
            safe_component(study.StudyTime.split(".")[0], "notime"), digest])
        return StudyTarget(study.StudyInstanceUID, folder, pseudonymized=False), ""
    p = pseudo.pseudonymizer
    pseudonym = pseudo.pseudonym or p.pseudonym_for(study.PatientID)
    new_uid = p.uid(study.StudyInstanceUID)
    date = _written_date(study.StudyDate, p, study.PatientID)
    # Only the pseudonym, the date as written into the data and the new UID.
    folder = Path(unique_component(pseudonym, "pseudonym")) / f"{date}-{new_uid}"
    return StudyTarget(new_uid, folder, pseudonymized=True), pseudonym


def _written_date(date: str, p: Pseudonymizer, patient_id: str) -> str:
    if not date or p.options.dates == "remove":
        return "nodate"
    if p.options.dates == "keep":
        return safe_component(date, "nodate")
    try:
        day = dt.date(int(date[:4]), int(date[4:6]), int(date[6:8]))
    except ValueError:
        return "nodate"
    return (day - dt.timedelta(days=p.date_offset(patient_id))).strftime("%Y%m%d")


def transfer_study(plan: TransferPlan, job: StudyJob) -> StudyOutcome:
    """Move one study (or some of its series); raises on failure, returns the counts.

    The caller holds the slots of `plan.nodes` (or the plan's connections take their own)."""
    source, sink = plan.source, plan.sink
    study_uid, series_uids = job.study_uid, job.series_uids
    pseudonymization = (Pseudonymization(plan.pseudonymizer, job.pseudonym or None)
                        if plan.pseudonymizer else None)
    found = find_studies(source, Query(study_uid=study_uid))
    if not found:
        raise StudyNotFound(f"{source.node.name}: study not found")
    target, pseudonym = study_target(found[0], pseudonymization)
    expected = manifest(source, study_uid, series_uids)
    if not expected:
        raise StudyNotFound(f"{source.node.name}: study not found (no instances listed)")

    def destination_uid(uid: str) -> str:
        return pseudonymization.pseudonymizer.uid(uid) if pseudonymization else uid

    wanted = {destination_uid(uid) for uid in expected.instances}
    present = sink.present(target) & wanted
    outcome = StudyOutcome("success", expected=len(expected), transferred=0,
                           pseudonym=pseudonym, destination_study_uid=target.study_uid)
    if present == wanted:
        logger.info("study already complete at the destination (%d instances)", len(present))
        outcome.skipped = len(present)
        outcome.message = "already complete at the destination"
        return outcome

    counts = _Counts()
    logger.info("%s: %d of %d instances to send by %s", source.node.name,
                len(wanted) - len(present), len(wanted), plan.retriever.method)
    stream = plan.retriever.retrieve(
        study_uid, series_uids, frozenset(expected.sop_classes),
        {uid: i.SeriesInstanceUID for uid, i in expected.instances.items()})
    with stream:
        try:
            result = sink.write(target, _prepare(stream, set(expected.instances), present,
                                                 pseudonymization, destination_uid, counts))
        except StudyNotFound as exc:
            # The PACS listed the instances a moment ago: failing to send them is transient.
            raise IncompleteRetrieval(f"{exc}, though C-FIND listed {len(expected)} instances",
                                      expected=len(expected), received=0) from None
    # What arrived is written; now say what went wrong, permanent reasons first.
    refused = result.error("the destination")
    if refused is not None:
        raise refused
    if stream.rejected:
        raise InvalidData(f"{len(stream.rejected)} instance(s) failed the arrival checks and "
                          f"were put aside: {_reasons(stream.rejected)}")
    now_present = sink.present(target) & wanted
    missing = wanted - now_present - counts.left_out
    if missing:
        raise IncompleteRetrieval(
            f"destination holds {len(wanted) - len(missing)} of {len(wanted)} instances",
            expected=len(wanted), received=len(wanted) - len(missing))
    outcome.transferred = len(result.stored)
    outcome.skipped = len(present) + len(counts.left_out)
    logger.info("study complete at the destination: %d sent, %d already there, %d withheld "
                "(burned-in annotation), %d withheld (leak check)", outcome.transferred,
                len(present), len(counts.burned_in), len(counts.withheld))
    notes = []
    if counts.burned_in:
        notes.append(f"{len(counts.burned_in)} instance(s) flagged with burned-in annotation "
                     "were not sent")
    if counts.withheld:
        # Warning, not failure: nothing identifying left, and what was sent is checked; the
        # note names the attribute so that the gap can be found and closed.
        notes.append(f"{len(counts.withheld)} instance(s) withheld: "
                     + _reasons(counts.withheld.values()))
    if counts.unlisted:
        notes.append(f"{counts.unlisted} instance(s) the source did not list for the study "
                     "were not sent")
    notes += result.notes  # e.g. series not converted to NIfTI (adit_tasks.core.nifti)
    if notes:
        outcome.status = "warning"
        outcome.message = "; ".join(notes)
    elif present:
        outcome.message = f"{len(present)} instance(s) were already at the destination"
    return outcome


def _reasons(reasons: Iterable[str]) -> str:
    """'reason (3); other reason (1)': the distinct reasons, most frequent first."""
    counted = Counter(reasons).most_common()
    shown = "; ".join(f"{reason} ({n})" for reason, n in counted[:3])
    return shown + (f"; and {len(counted) - 3} other reason(s)" if len(counted) > 3 else "")


def _prepare(stream: Iterator[DicomInstance], listed: set[str], present: set[str],
             pseudonymization: Pseudonymization | None, destination_uid,
             counts: _Counts) -> Iterator[DicomInstance]:
    """Leave out what the source did not list and what the destination has, pseudonymize the
    rest, set aside burned-in images and withhold instances that fail the leak check."""
    study_uids = frozenset(listed)
    for instance in stream:
        if instance.sop_instance_uid not in listed:
            counts.unlisted += 1  # added to the study since the C-FIND, or not of this study
            continue
        new_uid = destination_uid(instance.sop_instance_uid)
        if new_uid in present:
            continue
        if pseudonymization is None:
            yield instance
            continue
        if not {instance.study_uid, instance.series_uid} <= study_uids:
            study_uids = study_uids | {instance.study_uid, instance.series_uid}
        try:
            out = pseudonymization.pseudonymizer.pseudonymize(
                instance, pseudonymization.pseudonym, study_uids=study_uids)
        except BurnedInAnnotation:
            counts.burned_in.add(new_uid)
            continue
        except LeakFound as exc:  # never sent; the attribute is named, never the value
            logger.warning("instance withheld: %s", exc)
            counts.withheld[new_uid] = str(exc)
            continue
        yield out
