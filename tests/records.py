"""Searching Prefect's records for patient data (tests/test_privacy_records.py).

Three views of what a Prefect server keeps, each searched for "needles" (a marker patient's
name, ID, birth date, accession numbers, original UIDs), case-insensitively:

* `scan_database`: every column of every row of every table of the server's SQLite file, one
  query per table; each hit comes with its row, so the caller can tell an allowed place (flow
  run parameters, the query's result table) from a leak.
* `raw_counts` on a `VACUUM INTO` copy of that file: the bytes of the live database (tables
  and indexes, no free pages), to prove that the row-by-row scan saw every occurrence, in
  whatever column type or encoding.
* `scan_api`: what the API hands out: flow runs (names, state messages, their state history),
  task runs and their states, logs, artifacts, variables and events.

And `scan_folder` for files (result storage): raw bytes, plus every base64 value of a JSON
document decoded (Prefect's result records keep pickles that way).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Hit:
    """A needle found: where (a table and column, an API object, a file), the row (for
    database hits) and a short excerpt around it."""

    where: str
    needle: str
    excerpt: str
    row: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    table: str = ""
    column: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.needle!r} in ...{self.excerpt}..."


def report(hits: Iterable[Hit]) -> str:
    """The hits grouped by place and needle, with one excerpt each (a readable failure)."""
    groups: dict[tuple[str, str], list[Hit]] = {}
    for hit in hits:
        groups.setdefault((hit.where, hit.needle), []).append(hit)
    return "\n".join(f"{len(found)} x {found[0]}" for found in groups.values())


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def find_needles(text: str, needles: Iterable[str]) -> Iterator[tuple[str, str, int]]:
    """(needle, excerpt, count) for each needle in `text` (case-insensitive)."""
    low = text.lower()
    for needle in needles:
        at = low.find(needle.lower())
        if at >= 0:
            yield needle, text[max(0, at - 60):at + len(needle) + 60], low.count(needle.lower())


def database_file() -> Path:
    """The SQLite file of the Prefect server the session runs (prefect_test_harness)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    if hasattr(url, "get_secret_value"):
        url = url.get_secret_value()
    prefix = "sqlite+aiosqlite:///"
    assert str(url).startswith(prefix), f"not an SQLite database: {url}"
    return Path(str(url)[len(prefix):])


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        yield conn
    finally:
        conn.close()


def scan_database(path: Path, needles: list[str]) -> tuple[list[Hit], dict[str, int]]:
    """Every hit in every column of every table, and how often each needle occurs in all."""
    hits: list[Hit] = []
    counts = dict.fromkeys(needles, 0)
    with _read_only(path) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
            if not columns:
                continue
            tests = " OR ".join(f'instr(lower(CAST("{c}" AS TEXT)), ?) > 0'
                                for c in columns for _ in needles)
            args = [n.lower() for _ in columns for n in needles]
            for values in conn.execute(f'SELECT * FROM "{table}" WHERE {tests}', args):
                row = dict(zip(columns, values, strict=True))
                for column, value in row.items():
                    for needle, excerpt, count in find_needles(_text(value), needles):
                        counts[needle] += count
                        hits.append(Hit(f"database {table}.{column}", needle, excerpt, row,
                                        table, column))
    return hits, counts


def vacuum_copy(path: Path, target: Path) -> Path:
    """The live database (no free pages, no write-ahead log) as one file."""
    target.unlink(missing_ok=True)
    with _read_only(path) as conn:
        conn.execute("VACUUM INTO ?", (str(target),))
    return target


def raw_counts(paths: Iterable[Path], needles: list[str]) -> dict[str, int]:
    """How often each needle occurs in the bytes of these files (case-insensitive ASCII)."""
    counts = dict.fromkeys(needles, 0)
    for path in paths:
        if not path.is_file():
            continue
        data = path.read_bytes().lower()
        for needle in needles:
            counts[needle] += data.count(needle.lower().encode())
    return counts


def _base64(text: str | bytes) -> Iterator[bytes]:
    """The text decoded as base64 (line breaks allowed), if it is base64."""
    compact = "".join(text.split()) if isinstance(text, str) else b"".join(text.split())
    if len(compact) >= 16:
        with contextlib.suppress(binascii.Error, ValueError):
            yield base64.b64decode(compact, validate=True)


def _decoded(value: Any) -> Iterator[bytes]:
    """Base64 strings anywhere in a JSON value, decoded."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _decoded(v)
    elif isinstance(value, list):
        for v in value:
            yield from _decoded(v)
    elif isinstance(value, str):
        yield from _base64(value)


def scan_folder(folder: Path, needles: list[str], since: float = 0.0) -> tuple[list[Hit], int]:
    """Hits in the files under `folder` changed since `since` (their bytes, the file decoded
    as base64, the base64 values of a JSON file decoded); and how many files were searched.
    Pickles keep strings as UTF-8 bytes, so a needle in a pickled value is found."""
    hits: list[Hit] = []
    searched = 0
    if not folder.is_dir():
        return hits, searched
    for path in folder.rglob("*"):
        if not path.is_file() or path.stat().st_mtime < since:
            continue
        searched += 1
        data = path.read_bytes()
        blobs = [data, *_base64(data)]  # a result file is JSON, or a bare base64 pickle
        with contextlib.suppress(ValueError):
            blobs += list(_decoded(json.loads(data)))
        for blob in blobs:
            for needle, excerpt, _ in find_needles(blob.decode("latin-1"), needles):
                hits.append(Hit(f"file {path}", needle, excerpt))
    return hits, searched


# --- the API -----------------------------------------------------------------------------------


def _page(read: Any, **kw: Any) -> Iterator[Any]:
    offset = 0
    while True:
        batch = read(limit=200, offset=offset, **kw)
        yield from batch
        if len(batch) < 200:
            return
        offset += 200


def scan_api(client: Any, needles: list[str], flow_run_ids: set[UUID], *,
             since: Any, skip_artifact_keys: frozenset[str] = frozenset()) -> list[Hit]:
    """Hits in what the API shows of these flow runs (everything but their parameters), their
    task runs, their logs and artifacts (but those with `skip_artifact_keys`, and the events
    that copy them), all variables, and the events since `since`."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    hits: list[Hit] = []

    def search(where: str, value: Any) -> None:
        for needle, excerpt, _ in find_needles(_text(value), needles):
            hits.append(Hit(where, needle, excerpt))

    ids = list(flow_run_ids)
    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    for run in runs:
        fields = run.model_dump(mode="json", exclude={"parameters"})
        search(f"flow run {run.name}", fields)
        for state in client.read_flow_run_states(run.id):
            search(f"flow run {run.name} state {state.name}",
                   state.model_dump(mode="json"))
    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
        id=FlowRunFilterId(any_=ids)))
    for task_run in task_runs:
        search(f"task run {task_run.name}", task_run.model_dump(mode="json"))
        for state in client.read_task_run_states(task_run.id):
            search(f"task run {task_run.name} state {state.name}",
                   state.model_dump(mode="json"))
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))
    for log in _page(client.read_logs, log_filter=log_filter):
        search(f"log {log.name} {log.level}", log.message)
    for artifact in _page(client.read_artifacts, flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=ids))):
        if artifact.key not in skip_artifact_keys:
            search(f"artifact {artifact.key or artifact.type}",
                   artifact.model_dump(mode="json"))
    for variable in client.read_variables():
        search(f"variable {variable.name}", variable.value)
    for event in read_events(client, since):
        name = event.get("resource", {}).get("prefect.resource.name")
        if str(event.get("event")).startswith("prefect.artifact-collection.") and (
                name in skip_artifact_keys):  # Prefect's copy of a skipped artifact
            continue
        search(f"event {event.get('event')}", event)
    return hits


def read_events(client: Any, since: Any) -> Iterator[dict[str, Any]]:
    """Every event that occurred since `since` (the events API, page by page)."""
    body = {"filter": {"occurred": {"since": since.isoformat()}, "order": "ASC"}, "limit": 50}
    answer = client.request("POST", "/events/filter", json=body).json()
    while True:
        yield from answer.get("events", [])
        next_page = answer.get("next_page")
        if not next_page:
            return
        answer = client._client.get(next_page).json()


def wait_for_quiet_events(path: Path, quiet: float = 3.0, timeout: float = 30.0) -> None:
    """Until the server's events table has not grown for `quiet` seconds (the server writes
    events in batches, a few seconds after they happen)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with _read_only(path) as conn:
            count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.5)


def wait_for_paused_run(client: Any, name: str, timeout: float = 90) -> Any:
    """The flow run of this name once it is paused."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[name])))
        paused = [r for r in runs if r.state and r.state.is_paused()]
        if paused:
            return paused[0]
        time.sleep(0.5)
    raise AssertionError(f"the flow run {name} never paused")


def wait_for_final(client: Any, run_ids: Iterable[UUID], timeout: float = 180) -> dict[UUID, Any]:
    """The final states of these flow runs (AssertionError when one is not final in time)."""
    pending = set(run_ids)
    states: dict[UUID, Any] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for run_id in list(pending):
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                states[run_id] = state
                pending.discard(run_id)
        if pending:
            time.sleep(1)
    assert not pending, f"flow runs not finished in {timeout} s: {pending}"
    return states
