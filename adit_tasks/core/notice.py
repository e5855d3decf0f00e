"""The message a job sends when it ends (README, "Notifications"), and who may receive it.

A notice is built from counts only: the job's kind, its run name, an outcome, how many items
ended in each status, and a link to the run. It never takes a study, a result or a batch row,
so no patient data (names, IDs, birth dates, UIDs) and no free-text result message (errors
may quote a peer) can reach a message that leaves the hospital's Prefect server: the guarantee
is in the signature. The run name is checked here too (a run may be renamed by hand).

Recipients are e-mail addresses or http(s) webhook URLs, checked once where they enter (a flow
parameter, the CLI, the nodes file): `recipients()` names a bad entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from adit_tasks.core.errors import InvalidInput

Outcome = Literal["success", "partial", "failure"]

# Statuses that mean "not (fully) done" in a run's results (core.results.Status and the batch
# flows' row statuses); everything else (success, found, not found, skipped) is an answer.
FAILED = "failure"
NOT_DONE = frozenset({"warning", "postponed"})

_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\Z")
_SAFE = re.compile(r"[^A-Za-z0-9_.\- ]")


@dataclass(frozen=True)
class Recipients:
    """Who hears about a job's end: e-mail addresses and webhook URLs, each once."""

    emails: tuple[str, ...] = ()
    webhooks: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.emails or self.webhooks)

    def __add__(self, other: Recipients) -> Recipients:
        return Recipients(tuple(dict.fromkeys(self.emails + other.emails)),
                          tuple(dict.fromkeys(self.webhooks + other.webhooks)))


def recipients(entries: Iterable[str], what: str = "notify") -> Recipients:
    """The entries sorted into e-mail addresses and http(s) URLs; InvalidInput naming the
    first bad entry (an address of staff or a URL: no patient data) by position and value."""
    emails: list[str] = []
    webhooks: list[str] = []
    entries = list(entries)
    for n, raw in enumerate(entries, start=1):
        entry = raw.strip() if isinstance(raw, str) else ""
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname or re.search(
                    r"\s", entry) or not _valid_port(parts):
                raise InvalidInput(f"{what} entry {n} of {len(entries)} ({_shown(entry)}) is "
                                   "not a webhook URL: only http:// or https:// with a host")
            webhooks.append(entry)
        elif is_email(entry):
            emails.append(entry)
        else:
            raise InvalidInput(f"{what} entry {n} of {len(entries)} ({_shown(entry)}) is "
                               "neither an e-mail address (name@host) nor an http(s) URL")
    return Recipients(tuple(dict.fromkeys(emails)), tuple(dict.fromkeys(webhooks)))


def _valid_port(parts: SplitResult) -> bool:
    """A port that is absent or a number in range (`:abc` would fail only when sending)."""
    try:
        parts.port  # noqa: B018 - the property raises ValueError for a bad port
    except ValueError:
        return False
    return True


def is_email(value: str) -> bool:
    """One bare address (no display name, nothing that could break out of a mail header)."""
    return len(value) <= 254 and _EMAIL.match(value) is not None


def _shown(entry: str) -> str:
    return repr(entry[:80] + ("..." if len(entry) > 80 else ""))


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    """How many items ended in each status, in a stable order."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))


def outcome_of(counts: Mapping[str, int]) -> Outcome:
    """failure: every item failed; partial: some failed, warned or wait for a window;
    success: the rest (also a job with nothing to do)."""
    total = sum(counts.values())
    failed = counts.get(FAILED, 0)
    if total and failed == total:
        return "failure"
    if failed or any(counts.get(s, 0) for s in NOT_DONE):
        return "partial"
    return "success"


@dataclass(frozen=True)
class Notice:
    """One message, in the three shapes it is sent: subject and text for e-mail, a small
    JSON object for webhooks (with the text under "text", which chat webhooks show)."""

    subject: str
    text: str
    payload: dict[str, object] = field(default_factory=dict)


def notice(kind: str, run_name: str, run_id: str, counts: Mapping[str, int], *,
           unit: str, link: str | None, outcome: Outcome | None = None,
           stopped: bool = False) -> Notice:
    """The message for a job's end. `counts`: items by status (`status_counts`); `unit`:
    what they are (studies, rows); `link`: the run in the Prefect UI, None when the UI is
    unknown (a temporary Prefect server); `outcome`: given when the counts are not statuses
    (a continuous run's tally), else derived from them; `stopped`: the run stopped with an
    error before its results were known (a failure without counts; the error's text is not
    sent, it may name what the run was given)."""
    name = _safe(run_name) or "unnamed run"
    run = _safe(run_id)
    counted = {_safe(status): int(n) for status, n in counts.items()}
    result = "failure" if stopped else outcome or outcome_of(counted)
    total = sum(counted.values()) if outcome is None and not stopped else None
    summary = ("stopped by an error" if stopped else
               ", ".join(f"{n} {status}" for status, n in counted.items()) or f"no {unit}")
    subject = f"[ADIT] {kind} {result}: {name} ({summary})"
    where = (f"Run in the Prefect UI: {link}" if link else
             "Run in the Prefect UI: no link, the run used a temporary Prefect server "
             "(set PREFECT_API_URL or PREFECT_UI_URL for links)")
    lines = [f"ADIT {kind} run {name} ended: {result}.", ""]
    if stopped:
        lines.append("It stopped with an error before its results were known; the run's logs "
                     "say why.")
    if total is not None:
        lines.append(f"{unit.capitalize()}: {total}")
    lines += [f"  {status}: {n}" for status, n in counted.items()]
    lines += ["", where, f"Run id: {run}  (log: prefect flow-run logs {run})"]
    text = "\n".join(lines) + "\n"
    payload: dict[str, object] = {
        "source": "adit", "kind": kind, "run_name": name, "run_id": run, "outcome": result,
        "unit": unit, "counts": counted, "total": total, "stopped": stopped, "url": link,
        "subject": subject, "text": text}
    return Notice(subject, text, payload)


def _safe(text: str) -> str:
    """Letters, digits, `_.- ` only, at most 100 characters: run names and statuses are
    ours, but a run can be renamed by hand."""
    return _SAFE.sub("_", str(text))[:100].strip()
