"""Transfer windows: when a PACS may be loaded by transfers.

A window is written as text, one or more rules separated by `;` or `,`:

    Mon-Fri 20:00-06:00; Sat-Sun 00:00-24:00
    daily 19:00-07:00
    Mon,Wed 22:00-23:30

Each rule names the days a window *starts* on (Mon..Sun, ranges such as Fri-Mon wrap around
the week, `daily` for all) and a time range in local time. A range whose end is not after its
start crosses midnight: `Mon-Fri 20:00-06:00` covers Friday 20:00 to Saturday 06:00 too.
`00:00-24:00` is the whole day. An empty window means "always open".

`clock()` is the one place that reads the time, so tests can move it.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass

from adit_tasks.core.errors import AditError, InvalidInput

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def clock() -> dt.datetime:
    """Now, in local time (naive). Tests replace this function."""
    return dt.datetime.now()


def sleep_until(at: dt.datetime, *, step: float = 60.0) -> None:
    """Wait until `clock()` reaches `at`, looking again at least every `step` seconds."""
    while (left := (at - clock()).total_seconds()) > 0:
        time.sleep(min(left, step))


class OutsideWindow(AditError):
    """A node's transfer window is closed; the work continues when it opens (neither a
    retriable failure, which would retry within minutes, nor a permanent one)."""

    def __init__(self, node: str, opens: dt.datetime) -> None:
        super().__init__(f"outside the transfer window of {node}; it opens at "
                         f"{opens:%Y-%m-%d %H:%M}")
        self.node = node
        self.opens = opens


@dataclass(frozen=True)
class _Rule:
    days: frozenset[int]  # weekday numbers the window starts on (Mon = 0)
    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start means the next day

    def intervals(self, day: dt.date) -> list[tuple[dt.datetime, dt.datetime]]:
        if day.weekday() not in self.days:
            return []
        begin = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=self.start)
        length = (self.end - self.start) % (24 * 60) or 24 * 60
        return [(begin, begin + dt.timedelta(minutes=length))]


@dataclass(frozen=True)
class TransferWindow:
    """When transfers may touch a node; see the module docstring for the notation."""

    text: str
    rules: tuple[_Rule, ...]

    @classmethod
    def parse(cls, text: str | None) -> TransferWindow:
        text = (text or "").strip()
        rules = tuple(_parse_rule(part.strip(), text)
                      for part in re.split(r"\s*;\s*", text) if part.strip())
        return cls(text, rules)

    @property
    def always_open(self) -> bool:
        return not self.rules

    def _intervals_around(self, at: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
        out = []
        for offset in range(-1, 9):  # yesterday's window may still be open; a week ahead
            day = at.date() + dt.timedelta(days=offset)
            for rule in self.rules:
                out += rule.intervals(day)
        return sorted(out)

    def is_open(self, at: dt.datetime | None = None) -> bool:
        if self.always_open:
            return True
        at = at or clock()
        return any(start <= at < end for start, end in self._intervals_around(at))

    def next_open(self, at: dt.datetime | None = None) -> dt.datetime:
        """`at` itself when open, else when the window opens next."""
        at = at or clock()
        if self.is_open(at):
            return at
        return min(start for start, _ in self._intervals_around(at) if start > at)

    def closes(self, at: dt.datetime | None = None) -> dt.datetime | None:
        """When the window open at `at` closes (None when always open or closed now)."""
        if self.always_open:
            return None
        at = at or clock()
        ends = [end for start, end in self._intervals_around(at) if start <= at < end]
        return max(ends) if ends else None


def check_window_text(value: str) -> str:
    """A pydantic validator: the text when it is a valid window, else ValueError."""
    try:
        TransferWindow.parse(value)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None
    return value


_RULE = re.compile(
    r"^(?P<days>daily|[a-z]{3}(?:\s*-\s*[a-z]{3})?(?:\s*,\s*[a-z]{3}(?:\s*-\s*[a-z]{3})?)*)"
    r"\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})$", re.IGNORECASE)


def _minutes(text: str, whole: str) -> int:
    hours, minutes = (int(x) for x in text.split(":"))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise InvalidInput(f"transfer window '{whole}': invalid time '{text}'")
    return hours * 60 + minutes


def _parse_rule(part: str, whole: str) -> _Rule:
    match = _RULE.match(part)
    if not match:
        raise InvalidInput(f"transfer window '{whole}': cannot read '{part}' (write e.g. "
                           "'Mon-Fri 20:00-06:00; Sat-Sun 00:00-24:00')")
    days: set[int] = set()
    spec = match["days"].lower()
    if spec == "daily":
        days = set(range(7))
    else:
        for item in re.split(r"\s*,\s*", spec):
            ends = [d.strip() for d in item.split("-")]
            if any(d not in DAYS for d in ends):
                raise InvalidInput(f"transfer window '{whole}': unknown day in '{item}'")
            first, last = DAYS.index(ends[0]), DAYS.index(ends[-1])
            days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    start, end = _minutes(match["start"], whole), _minutes(match["end"], whole)
    if end == 24 * 60 and start == 0:
        end = 0  # whole day: handled as a 24 h length
    return _Rule(frozenset(days), start % (24 * 60), end % (24 * 60))
