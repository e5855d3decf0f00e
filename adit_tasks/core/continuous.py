"""Continuous transfer: the plain logic (state, the plan of a run, date chunks, filters), no
Prefect.

A job works through its history oldest first, a chunk of days per C-FIND (split further when a
query hits the server's result limit), and then keeps up with new studies, sweeping a short
overlap again every run because studies arrive at a PACS late and incomplete. Behind the
overlap it re-checks the history already swept, a few chunks per run, round-robin, for studies
filed late under old dates. Its state is a small JSON document that the flow keeps in a Prefect
variable, where every worker sees it.

`RunPlanner` is one run: it hands out the run's steps one at a time (the earlier failures to
retry, the sweep chunks up to the horizon, the re-check chunks) and is told what each step
found and transferred; only a chunk done in full moves the cursor or the re-check position.
The flow runs the queries and transfers; the planner decides, and is tested with a clock and
no servers.

Failed studies and patient data. The state is a Prefect variable: the UI shows it, and
Prefect copies every update into an event. A job that does not pseudonymize keeps a failed
study by its StudyInstanceUID (the destination holds that UID anyway) and retries it by UID.
A pseudonymizing job must not record original UIDs, and a plain hash of a UID would not do:
UIDs are guessable (an organisation root, dates, counters) and anyone who can list the PACS
can hash its UIDs and find the study again. It keeps a keyed digest instead (`keyed_digest`:
HMAC-SHA256 with the pseudonymization secret, which can already re-identify everything the job
sent) and the chunk of days the study was found in. A digest cannot be queried, so the retry
sweeps that chunk again with the job's filter and transfers the studies whose digests are
failed ones (a chunk step with `keys`). A failed study is never dropped: it stays failed until
a transfer of it succeeds, found by its retry chunk or by any later sweep or re-check (its
digest is recognised wherever it is found); one not found again in its chunk (deleted, or
re-dated by the PACS) stays failed with that message, like a study not found by its UID.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from adit_tasks.core import find
from adit_tasks.core.association import Connection
from adit_tasks.core.dates import date_or_none, dicom_date, parse_date
from adit_tasks.core.errors import ConfigError, InvalidInput
from adit_tasks.core.results import StudyJob, StudyResult

logger = logging.getLogger(__name__)

MESSAGE_CHARS = 200  # of a failed study's message kept in the state
STAMP = "%Y-%m-%d %H:%M"
DIGEST_PREFIX = "hmac:"  # a failed study's key that is a keyed digest, not a UID
_DIGEST_LABEL = b"adit-continuous-failed-study\x00"  # keeps these digests apart from others
NOT_FOUND_AGAIN = "not found again in the chunk of days it was found in; searched again next run"


def keyed_digest(secret: str) -> Callable[[str], str]:
    """How a pseudonymizing job keeps a failed study: `hmac:` and the first 128 bits of
    HMAC-SHA256(secret, label + StudyInstanceUID), in hex (see the module docstring)."""
    key = secret.encode()

    def digest(uid: str) -> str:
        mac = hmac.new(key, _DIGEST_LABEL + uid.encode(), hashlib.sha256)
        return DIGEST_PREFIX + mac.hexdigest()[:32]

    return digest


def is_digest(key: str) -> bool:
    return key.startswith(DIGEST_PREFIX)


def _day(text: str, what: str) -> dt.date:
    """A date of the saved state (YYYYMMDD)."""
    day = date_or_none(text)
    if day is None:
        raise InvalidInput(f"the job's saved state has an invalid {what}: {text[:20]!r}")
    return day


@dataclass
class JobState:
    """What a continuous job has done: the next day of the sweep, the failures to retry and
    where the re-check of swept history stands (with when its last full cycle finished).

    Saved as a JSON object; states saved before the re-check times existed load with their
    defaults."""

    cursor: str  # YYYYMMDD: days before it have been swept (the overlap is swept again)
    # study UID -> {attempts, message, series}, or, for a pseudonymizing job, keyed digest
    # (`hmac:...`) -> {attempts, message, chunk: [first, last] YYYYMMDD}
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    recheck: str = ""  # YYYYMMDD: where the slow re-check of swept history goes on
    transferred_total: int = 0
    runs: int = 0
    recheck_cycles: int = 0  # full re-check cycles finished
    recheck_cycle_started: str = ""  # when the current cycle checked its first chunk
    recheck_cycle_finished: str = ""  # when the last full cycle finished

    @classmethod
    def load(cls, data: Any, start: dt.date) -> JobState:
        if not isinstance(data, dict) or "cursor" not in data:
            return cls(cursor=dicom_date(start))
        return cls(cursor=str(data["cursor"]), failed=dict(data.get("failed") or {}),
                   recheck=str(data.get("recheck") or ""),
                   transferred_total=int(data.get("transferred_total") or 0),
                   runs=int(data.get("runs") or 0),
                   recheck_cycles=int(data.get("recheck_cycles") or 0),
                   recheck_cycle_started=str(data.get("recheck_cycle_started") or ""),
                   recheck_cycle_finished=str(data.get("recheck_cycle_finished") or ""))

    def dump(self, limit: int | None = None) -> dict[str, Any]:
        """The state as JSON data; with `limit`, failure messages are shortened (they are in
        the run reports too) until it fits in `limit` characters."""
        data = asdict(self)
        for chars in (MESSAGE_CHARS, 80, 20, 0):
            if limit is None or _size(data) <= limit:
                break
            data["failed"] = {uid: {**info, "message": str(info.get("message", ""))[:chars]}
                              for uid, info in self.failed.items()}
        return data

    def fits(self, limit: int) -> bool:
        """Whether the state fits in `limit` characters (messages shortened if need be)."""
        return _size(self.dump(limit)) <= limit


def _size(data: dict[str, Any]) -> int:
    """Length of the compact JSON (as UTF-8), the way Prefect measures a variable's value."""
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


@dataclass(frozen=True)
class Sweep:
    """The dates a job covers and how it walks through them (the job's settings)."""

    start: dt.date
    end: dt.date | None = None
    chunk_days: int = 7
    overlap_days: int = 3
    recheck_chunks: int = 1
    max_studies: int = 500  # per run: no new chunk starts once this many were found

    @classmethod
    def of(cls, start_date: str, end_date: str = "", chunk_days: int = 7,
           overlap_days: int = 3, recheck_chunks: int = 1,
           max_studies_per_run: int = 500) -> Sweep:
        """The job's settings, checked (flow parameters as given)."""
        if chunk_days < 1 or overlap_days < 0 or recheck_chunks < 0 or max_studies_per_run < 1:
            raise ConfigError("chunk_days and max_studies_per_run must be at least 1, "
                              "overlap_days and recheck_chunks not negative")
        start = parse_date(start_date, "start_date")
        end = parse_date(end_date, "end_date") if end_date else None
        if end is not None and end < start:
            raise ConfigError("end_date is before start_date")
        return cls(start, end, chunk_days, overlap_days, recheck_chunks, max_studies_per_run)

    def horizon(self, today: dt.date) -> dt.date:
        """The last day to sweep: today, or the end date once it has passed."""
        return min(self.end, today) if self.end else today

    def settled(self, state: JobState, today: dt.date) -> dt.date:
        """The first day not yet part of the swept history: the re-check covers
        [start, settled); the overlap (or the backlog) lies from here on."""
        return min(_day(state.cursor, "cursor"),
                   self.horizon(today) - dt.timedelta(days=self.overlap_days))

    def history_chunks(self, state: JobState, today: dt.date) -> int:
        days = (self.settled(state, today) - self.start).days
        return math.ceil(days / self.chunk_days) if days > 0 else 0

    def runs_per_cycle(self, state: JobState, today: dt.date) -> int | None:
        """Runs one full re-check of the swept history takes (None: re-check is off). A study
        filed late under an old date is found at most this many runs after it arrives."""
        if not self.recheck_chunks:
            return None
        return math.ceil(self.history_chunks(state, today) / self.recheck_chunks)

    def backlog_days(self, state: JobState, today: dt.date) -> int:
        return max(0, (self.horizon(today) - _day(state.cursor, "cursor")).days + 1)


StepKind = Literal["retry", "sweep", "recheck"]


@dataclass(frozen=True)
class Step:
    """One step of a run: the failed studies to retry (by UID: `retry`; by keyed digest:
    the chunk [first, last] to query again and the digests of its failed studies, `keys`),
    or a chunk of days [first, last] to query and transfer (of the sweep or the re-check)."""

    kind: StepKind
    first: dt.date | None = None
    last: dt.date | None = None
    retry: tuple[StudyJob, ...] = ()
    keys: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """For task run names and logs (dates only, never patient data)."""
        if self.kind == "retry" and self.first is None:
            return f"retry-{len(self.retry)}"
        assert self.first is not None and self.last is not None
        return f"{self.kind}-{dicom_date(self.first)}-{dicom_date(self.last)}"

    @property
    def by_digest(self) -> bool:
        """A retry of failed studies known by keyed digest: its chunk is queried again and
        only the studies whose digest is in `keys` are transferred."""
        return bool(self.keys)


@dataclass
class Tally:
    """What one run did (the counts of its report)."""

    found: int = 0  # by the sweep (and overlap)
    transferred: int = 0
    already_present: int = 0
    failed: int = 0
    postponed: int = 0
    retried: int = 0
    rechecked: int = 0  # studies found by the re-check of history

    def as_dict(self) -> dict[str, int]:
        return {"found": self.found, "transferred": self.transferred,
                "already present": self.already_present, "failed": self.failed,
                "postponed": self.postponed, "retried": self.retried,
                "rechecked": self.rechecked}


class RunPlanner:
    """The plan of one run of a continuous job, handed out a step at a time.

    `digest`: the job's `keyed_digest` when it pseudonymizes (its new failures are kept by
    digest and chunk, never by UID), None otherwise (kept by UID). Failures kept by digest
    are retried only when a digest is given (the job pseudonymizes again): until then they
    stay in the state, counted as failed.

    Order: the studies that failed in earlier runs; the sweep from the cursor (or the overlap,
    once the backlog is done) up to the horizon, a chunk of `chunk_days` per step; then
    `recheck_chunks` chunks of the swept history, round-robin from where the last run left
    it, wrapping to the start date after the chunk that reaches the settled history's end.

    After each step the caller reports its results with `record()` (before asking for the
    next step); `stop()` ends the run early (a closed transfer window). The cursor and the
    re-check position move only past a chunk done in full. The run stops, leaving them where
    they were, when a study is postponed (window closed), when the studies found reach the
    run's budget (checked before each chunk: a chunk started is finished), or when a chunk's
    new failures would not fit in `state_limit` characters of state (the chunk is swept
    again: failures are never dropped).
    """

    def __init__(self, state: JobState, sweep: Sweep, now: dt.datetime, *,
                 state_limit: int | None = None,
                 digest: Callable[[str], str] | None = None) -> None:
        self.state = state
        self.sweep = sweep
        self.now = now
        self.today = now.date()
        self.state_limit = state_limit
        self.digest = digest
        self.tally = Tally()
        self.stopped = ""  # why the run ended; "" while it goes on
        self._phase: StepKind = "retry"
        self._retries = self._retry_steps()
        horizon = sweep.horizon(self.today)
        cursor = _day(state.cursor, "cursor")
        self._day = max(sweep.start,
                        min(cursor, horizon - dt.timedelta(days=sweep.overlap_days)))
        self._rechecks = 0
        state.runs += 1

    # -- the steps --------------------------------------------------------------------------

    def next_step(self) -> Step | None:
        """The next step of this run, or None when the run is over (see `stopped`)."""
        if self.stopped:
            return None
        if self._phase == "retry":
            if self._retries:
                return self._retries.pop(0)
            self._phase = "sweep"
        horizon = self.sweep.horizon(self.today)
        if self._phase == "sweep":
            if self._day <= horizon:
                if self._budget_used():
                    return None
                last = min(self._day + dt.timedelta(days=self.sweep.chunk_days - 1), horizon)
                return Step("sweep", self._day, last)
            self._phase = "recheck"
        if self._rechecks < min(self.sweep.recheck_chunks,
                                self.sweep.history_chunks(self.state, self.today)):
            if self._budget_used():
                return None
            settled = self.sweep.settled(self.state, self.today)
            first = self.recheck_position()
            last = min(first + dt.timedelta(days=self.sweep.chunk_days - 1),
                       settled - dt.timedelta(days=1))
            return Step("recheck", first, last)
        self.stopped = "all steps done"
        return None

    def _retry_steps(self) -> list[Step]:
        """The retries of this run: one step for the studies kept by UID, one per chunk of
        days for those kept by keyed digest (when this run has the digest)."""
        failed = self.state.failed
        by_uid = tuple(StudyJob(key, tuple(info.get("series") or ()))
                       for key, info in failed.items() if not is_digest(key))
        steps = [Step("retry", retry=by_uid)] if by_uid else []
        if self.digest is None:
            return steps
        chunks: dict[tuple[str, str], set[str]] = {}
        for key, info in failed.items():
            if is_digest(key):
                first, last = [*(info.get("chunk") or ()), "", ""][:2]
                chunks.setdefault((str(first), str(last)), set()).add(key)
        for (first, last), keys in sorted(chunks.items()):
            steps.append(Step("retry", _day(first, "retry chunk"), _day(last, "retry chunk"),
                              keys=frozenset(keys)))
        return steps

    def key_of(self, uid: str) -> str:
        """The key a study has among the failed ones: its UID when it is kept by UID (or the
        job does not pseudonymize), else its keyed digest."""
        if self.digest is None or uid in self.state.failed:
            return uid
        return self.digest(uid)

    def recheck_position(self) -> dt.date:
        """The first day of the next re-check chunk."""
        settled = self.sweep.settled(self.state, self.today)
        first = _day(self.state.recheck, "re-check position") if self.state.recheck else None
        if first is None or not self.sweep.start <= first < settled:
            return self.sweep.start
        return first

    def _budget_used(self) -> bool:
        if self.tally.found + self.tally.rechecked < self.sweep.max_studies:
            return False
        self.stopped = f"the run's budget of {self.sweep.max_studies} studies is used"
        return True

    def stop(self, reason: str) -> None:
        """End the run now (the step in flight is not done: nothing moves past it)."""
        self.stopped = self.stopped or reason

    # -- what happened ----------------------------------------------------------------------

    def record(self, step: Step, results: Sequence[StudyResult]) -> bool:
        """Take in a step's results (one per study it found); True when the step was done in
        full, so the cursor or the re-check position moved past it."""
        if step.kind == "sweep":
            self.tally.found += len(results)
        elif step.kind == "recheck":
            self.tally.rechecked += len(results)
        elif step.by_digest:
            self.tally.retried += len(step.keys)
        else:
            self.tally.retried += len(results)
        chunk = ([dicom_date(step.first), dicom_date(step.last)]
                 if step.first is not None and step.last is not None else None)
        added = self._apply(results, chunk)
        if step.by_digest:
            self._not_found_again(step, results)
        done = True
        if added and self.state_limit and not self.state.fits(self.state_limit):
            for uid in added:  # found again when the chunk is swept again
                del self.state.failed[uid]
            self.stop(f"{len(self.state.failed) + len(added)} failed studies would not fit in "
                      "the job's state; the chunk is swept again next run")
            done = False
        if any(r.status == "postponed" for r in results):
            self.stop("the transfer window closed")
            done = False
        if not done:
            return False
        if step.kind == "sweep":
            assert step.last is not None
            self._day = step.last + dt.timedelta(days=1)
            self.state.cursor = dicom_date(max(_day(self.state.cursor, "cursor"), self._day))
        elif step.kind == "recheck":
            self._recheck_done(step)
        return True

    def _apply(self, results: Sequence[StudyResult], chunk: list[str] | None) -> list[str]:
        """Count outcomes and keep the failures (for the next run), by UID or by keyed digest
        and `chunk` (the days the step queried); the keys newly failed."""
        added = []
        failed = self.state.failed
        for r in results:
            key, days = self.key_of(r.job.study_uid), chunk
            if is_digest(key) and days is None:
                days = failed.get(key, {}).get("chunk")
                if not days:  # could not be found again by its digest: kept by its UID
                    key = r.job.study_uid
            if r.status == "postponed":
                self.tally.postponed += 1
            elif r.status == "failure":
                self.tally.failed += 1
                if key not in failed:
                    added.append(key)
                attempts = int(failed.get(key, {}).get("attempts", 0)) + 1
                info: dict[str, Any] = {"attempts": attempts,
                                        "message": r.message[:MESSAGE_CHARS]}
                if is_digest(key):
                    info["chunk"] = list(days or ())
                else:
                    info["series"] = list(r.job.series_uids)
                failed[key] = info
            else:
                failed.pop(key, None)
                if r.transferred:
                    self.tally.transferred += 1
                    self.state.transferred_total += 1
                else:
                    self.tally.already_present += 1
        return added

    def _not_found_again(self, step: Step, results: Sequence[StudyResult]) -> None:
        """The failed studies a retry by digest did not find in their chunk stay failed."""
        seen = {self.key_of(r.job.study_uid) for r in results}
        for key in sorted(step.keys - seen):
            info = self.state.failed.get(key)
            if info is None:
                continue
            info["attempts"] = int(info.get("attempts", 0)) + 1
            info["message"] = NOT_FOUND_AGAIN
            self.tally.failed += 1

    def _recheck_done(self, step: Step) -> None:
        assert step.first is not None and step.last is not None
        self._rechecks += 1
        stamp = self.now.strftime(STAMP)
        if step.first == self.sweep.start:
            self.state.recheck_cycle_started = stamp
        following = step.last + dt.timedelta(days=1)
        if following >= self.sweep.settled(self.state, self.today):  # the cycle is complete
            self.state.recheck = dicom_date(self.sweep.start)
            self.state.recheck_cycles += 1
            self.state.recheck_cycle_finished = stamp
        else:
            self.state.recheck = dicom_date(following)

    # -- the report -------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The run's counts and where the job stands (the flow's result data)."""
        return {**self.tally.as_dict(),
                "backlog_days": self.sweep.backlog_days(self.state, self.today),
                "cursor": self.state.cursor, "failed_total": len(self.state.failed),
                "recheck": dicom_date(self.recheck_position()),
                "runs_per_recheck_cycle": self.sweep.runs_per_cycle(self.state, self.today),
                "recheck_cycle_finished": self.state.recheck_cycle_finished,
                "stopped": self.stopped}

    def report_rows(self) -> list[dict[str, Any]]:
        """The run's report as table rows (dates and counts only, no patient data)."""
        state, sweep, today = self.state, self.sweep, self.today
        cursor = _day(state.cursor, "cursor")
        swept = (f"{cursor - dt.timedelta(days=1):%Y-%m-%d}" if cursor > sweep.start
                 else "nothing yet")
        position = self.recheck_position()
        runs = sweep.runs_per_cycle(state, today)
        history = sweep.settled(state, today) - dt.timedelta(days=1)
        rows: list[tuple[str, Any]] = [
            *self.tally.as_dict().items(),
            ("stopped because", self.stopped or "-"),
            ("swept up to", swept),
            ("backlog days left", sweep.backlog_days(state, today)),
            ("history to re-check", f"{sweep.start:%Y-%m-%d} to {history:%Y-%m-%d}"
             if history >= sweep.start else "none yet"),
            ("re-check position (next chunk starts)", f"{position:%Y-%m-%d}"),
            ("re-check cycle under way since",
             (state.recheck_cycle_started or "unknown") if position > sweep.start else "-"),
            ("runs per full re-check cycle",
             runs if runs is not None else "re-check is off (recheck_chunks = 0)"),
            ("full re-check cycles", state.recheck_cycles),
            ("last full re-check cycle finished", state.recheck_cycle_finished or "not yet"),
            ("failed, to retry next run", len(state.failed)),
            ("transferred by this job so far", state.transferred_total),
        ]
        return [{"measure": k, "value": v} for k, v in rows]


@dataclass(frozen=True)
class Pattern:
    """A text filter: DICOM wildcards (* ?), or a regular expression written as /.../,
    both case-insensitive. An empty pattern matches everything."""

    text: str = ""

    def __post_init__(self) -> None:
        if self.is_regex:
            try:
                re.compile(self.text[1:-1])
            except re.error as exc:
                raise InvalidInput(f"invalid regular expression {self.text}: {exc}") from None

    @property
    def is_regex(self) -> bool:
        return len(self.text) >= 2 and self.text.startswith("/") and self.text.endswith("/")

    @property
    def dicom_wildcard(self) -> str:
        """What the PACS may match itself ('' for a regex: we filter on our side)."""
        return "" if self.is_regex else self.text

    def matches(self, value: str) -> bool:
        if not self.text:
            return True
        if self.is_regex:
            return re.search(self.text[1:-1], value, re.IGNORECASE) is not None
        return fnmatch.fnmatchcase(value.casefold(), self.text.casefold().replace("[", "[[]"))


@dataclass(frozen=True)
class StudyFilter:
    """Which studies (and series) a continuous job wants."""

    modality: str = ""
    study_description: Pattern = Pattern()
    series_description: Pattern = Pattern()
    institution_name: Pattern = Pattern()
    min_instances: int = 0

    def query(self, start: dt.date, end: dt.date) -> find.Query:
        return find.Query(study_date=(dicom_date(start), dicom_date(end)),
                          modality=self.modality,
                          study_description=self.study_description.dicom_wildcard)

    def wants(self, study: find.Study) -> bool:
        return (self.study_description.matches(study.StudyDescription)
                and (study.NumberOfStudyRelatedInstances or 0) >= self.min_instances)


def find_chunk(conn: Connection, flt: StudyFilter, start: dt.date, end: dt.date,
               limit: int | None) -> list[find.Study]:
    """Studies of [start, end] that the filter wants. A query that returns `limit` results
    (the server's maximum) may be cut short, so the range is halved until it is not."""
    studies = find.find_studies(conn, flt.query(start, end))
    if limit and len(studies) >= limit and start < end:
        middle = start + (end - start) // 2
        return (find_chunk(conn, flt, start, middle, limit)
                + find_chunk(conn, flt, middle + dt.timedelta(days=1), end, limit))
    return [s for s in studies if flt.wants(s)]


def wanted_series(conn: Connection, flt: StudyFilter, study: find.Study) -> tuple[str, ...] | None:
    """The series to transfer: () for the whole study, None when nothing matches.

    Series filters (description, institution) need a series-level query; institution name is
    asked for at series level because most PACS do not index it for studies. A server that
    does not return an attribute the filter needs matches nothing: only what is verified to
    match is transferred.
    """
    if not (flt.series_description.text or flt.institution_name.text):
        return ()
    series = find.find_series(conn, find.Query(
        level=find.Level.SERIES, study_uid=study.StudyInstanceUID,
        series_description=flt.series_description.dicom_wildcard), parent=study)
    institutions = _series_institutions(conn, study) if flt.institution_name.text else {}
    chosen = tuple(s.SeriesInstanceUID for s in series
                   if flt.series_description.matches(s.SeriesDescription)
                   and (not flt.institution_name.text
                        or flt.institution_name.matches(institutions.get(s.SeriesInstanceUID,
                                                                         ""))))
    if not chosen:
        return None
    return () if len(chosen) == len(series) else chosen


def wanted_studies(conn: Connection, flt: StudyFilter, first: dt.date, last: dt.date,
                   limit: int | None = None) -> list[StudyJob]:
    """The studies of [first, last] that the filter wants, with their wanted series, as jobs
    (without a pseudonym). A study whose UID is not a valid UID is left out with a warning:
    no transfer could take it, and its value must not reach the state."""
    jobs = []
    invalid = 0
    for study in find_chunk(conn, flt, first, last, limit):
        try:
            uid = find.validate_uid(study.StudyInstanceUID)
        except InvalidInput:
            invalid += 1
            continue
        series = wanted_series(conn, flt, study)
        if series is not None:
            jobs.append(StudyJob(uid, series))
    if invalid:
        logger.warning("%s: %d studies of %s to %s have an invalid StudyInstanceUID; left out",
                       conn.node.name, invalid, first, last)
    return jobs


def _series_institutions(conn: Connection, study: find.Study) -> dict[str, str]:
    from pydicom import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study.StudyInstanceUID
    ds.SeriesInstanceUID = ""
    ds.InstitutionName = ""
    return {str(r.get("SeriesInstanceUID", "")): str(r.get("InstitutionName", "") or "")
            for r in find.find_datasets(conn, ds)}
