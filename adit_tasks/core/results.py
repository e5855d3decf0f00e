"""What a job asks for and what it got, as typed values from the study up to the terminal.

A `StudyJob` is one study to move (its series, its pseudonym); a `StudyResult` is its row in
every report: the CLI's lines, the flows' table artifacts, the batch result file and the
continuous job's state. Results stay typed until the very edge that prints or writes them.
Their messages name no patient and no original UID (they reach Prefect's records); a
pseudonymizing run's results leave out the original UIDs (`row`, `without_originals`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Literal

Status = Literal["success", "warning", "failure", "postponed"]


@dataclass(frozen=True)
class StudyJob:
    """One study to transfer: its UID (checked), optional series, optional pseudonym."""

    study_uid: str
    series_uids: tuple[str, ...] = ()
    pseudonym: str = ""


@dataclass(frozen=True)
class StudyResult:
    """The outcome of one job. `expected` is None when the study could not be listed;
    `opens` is when a postponed study may continue (its transfer window opens)."""

    number: int
    job: StudyJob
    status: Status
    expected: int | None = None
    transferred: int = 0
    skipped: int = 0
    message: str = ""
    pseudonym: str = ""
    destination_study_uid: str = ""
    opens: dt.datetime | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failure"

    def counts(self) -> str:
        """'12/40 instances', or '' when nothing was listed."""
        return "" if self.expected is None else f"{self.transferred}/{self.expected} instances"

    def row(self, *, pseudonymizing: bool) -> dict[str, object]:
        """The result as a table row; without original identifiers when pseudonymizing."""
        original = {} if pseudonymizing else {"StudyInstanceUID": self.job.study_uid}
        return {"study": self.number, **original, "status": self.status,
                "pseudonym": self.pseudonym,
                "destination_study_uid": self.destination_study_uid,
                "expected": "" if self.expected is None else self.expected,
                "transferred": self.transferred, "skipped": self.skipped,
                "message": self.message}

    def renumbered(self, number: int) -> StudyResult:
        return replace(self, number=number)

    def without_originals(self) -> StudyResult:
        """The result without the original UIDs (its job keeps only the pseudonym): what a
        pseudonymizing run hands to Prefect as its state data."""
        return replace(self, job=StudyJob("", (), self.job.pseudonym))


def summary(results: list[StudyResult], what: str = "studies") -> tuple[int, str]:
    """(number failed, one line for logs and state messages, free of patient data)."""
    failed = sum(r.failed for r in results)
    postponed = sum(r.status == "postponed" for r in results)
    done = len(results) - failed - postponed
    line = f"{done} of {len(results)} {what} transferred"
    if failed:
        line += f", {failed} failed"
    if postponed:
        line += f", {postponed} postponed"
    return failed, line
