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
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from adit_tasks.core.errors import IncompleteRetrieval, StudyNotFound
from adit_tasks.core.find import Query, Study, find_studies, manifest
from adit_tasks.core.folder import safe_component
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.plan import TransferPlan
from adit_tasks.core.pseudonymize import BurnedInAnnotation, Pseudonymizer
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


def study_target(study: Study, pseudo: Pseudonymization | None) -> tuple[StudyTarget, str]:
    """Where the study will live at the destination, and the pseudonym used ('' if none)."""
    modalities = safe_component(study.ModalitiesInStudy.replace(",", "_"), "OT")
    if pseudo is None:
        folder = Path(safe_component(study.PatientID, "nopatient")) / "-".join([
            safe_component(study.StudyDate, "nodate"),
            safe_component(study.StudyTime.split(".")[0], "notime"), modalities])
        return StudyTarget(study.StudyInstanceUID, folder, pseudonymized=False), ""
    p = pseudo.pseudonymizer
    pseudonym = pseudo.pseudonym or p.pseudonym_for(study.PatientID)
    new_uid = p.uid(study.StudyInstanceUID)
    date = _written_date(study.StudyDate, p, study.PatientID)
    # Only the pseudonym, the date as written into the data, modalities and new UIDs.
    folder = Path(safe_component(pseudonym, "pseudonym")) / f"{date}-{modalities}-{new_uid}"
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
    stream = plan.retriever.retrieve(study_uid, series_uids, frozenset(expected.sop_classes))
    with stream:
        try:
            result = sink.write(target, _prepare(stream, present, pseudonymization,
                                                 destination_uid, counts))
        except StudyNotFound as exc:
            # The PACS listed the instances a moment ago: failing to send them is transient.
            raise IncompleteRetrieval(f"{exc}, though C-FIND listed {len(expected)} instances",
                                      expected=len(expected), received=0) from None

    now_present = sink.present(target) & wanted
    missing = wanted - now_present - counts.burned_in
    if missing:
        refused = f"; {len(result.failed)} refused by the destination" if result.failed else ""
        raise IncompleteRetrieval(
            f"destination holds {len(wanted) - len(missing)} of {len(wanted)} instances"
            + refused, expected=len(wanted), received=len(wanted) - len(missing))
    outcome.transferred = len(result.stored)
    outcome.skipped = len(present) + len(counts.burned_in)
    logger.info("study complete at the destination: %d sent, %d already there, %d withheld "
                "(burned-in annotation)", outcome.transferred, len(present),
                len(counts.burned_in))
    if counts.burned_in:
        outcome.status = "warning"
        outcome.message = (f"{len(counts.burned_in)} instance(s) flagged with burned-in "
                           "annotation were not sent")
    elif present:
        outcome.message = f"{len(present)} instance(s) were already at the destination"
    return outcome


def _prepare(stream: Iterator[DicomInstance], present: set[str],
             pseudonymization: Pseudonymization | None, destination_uid,
             counts: _Counts) -> Iterator[DicomInstance]:
    """Leave out what the destination has, pseudonymize the rest, set aside burned-in images."""
    for instance in stream:
        new_uid = destination_uid(instance.sop_instance_uid)
        if new_uid in present:
            continue
        if pseudonymization is None:
            yield instance
            continue
        try:
            yield pseudonymization.pseudonymizer.pseudonymize(instance, pseudonymization.pseudonym)
        except BurnedInAnnotation:
            counts.burned_in.add(new_uid)
