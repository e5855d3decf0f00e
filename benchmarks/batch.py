"""Benchmark: the batch flows under Prefect versus the same DICOM work without Prefect.

Generates ``--studies`` small synthetic studies (one CT series, 1-2 instances of 64x64, a
patient and an accession each, dates spread over 2023), starts a source Orthanc (loaded with
them) and an empty destination Orthanc on loopback, writes a nodes YAML (``source``,
``destination``, a folder node ``folder``) and starts a temporary Prefect server
(``prefect_test_harness``: SQLite, a subprocess on 127.0.0.1; its start-up is not timed).

Then, each after one untimed warm-up:

* batch query: ``batch_query_flow`` over a CSV of ``--studies`` rows (even rows by
  StudyInstanceUID, odd rows by AccessionNumber) versus ``query_row`` over the same rows with a
  plain ``Connection`` (no Prefect), sequentially and with 4 threads (chunks of
  ``ROWS_PER_TASK`` rows, as the flow's task runner does);
* batch transfer (C-GET, then C-STORE to the destination, cleared before every run):
  ``batch_transfer_flow`` over the first ``--transfer`` studies versus the same
  ``transfer_study`` calls without Prefect, sequentially and with 4 threads.

Prints studies/s, instances/s and the share of the flow's wall time spent outside DICOM work,
``(flow - DICOM-only with 4 threads) / flow`` (target: under 10 %).

Run: ``.venv/bin/python benchmarks/batch.py [--studies 1000] [--transfer 200]``
"""

from __future__ import annotations

import os

# Before Prefect is imported: no telemetry, quiet logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from adit_tasks.core.association import Connection
from adit_tasks.core.batch import BatchRow, read_batch_file
from adit_tasks.core.batch_query import query_row
from adit_tasks.core.config import RetryPolicy, Settings, load_settings
from adit_tasks.core.get import CGet
from adit_tasks.core.plan import Gate, TransferPlan
from adit_tasks.core.results import StudyJob
from adit_tasks.core.sinks import ServerSink
from adit_tasks.core.transfer import transfer_study
from adit_tasks.lab.servers import OrthancServer
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, write_study

LOOPBACK = "127.0.0.1"
ADIT_AE = "ADIT"
SOURCE_AE = "ORTHANC1"
DEST_AE = "ORTHANC2"
THREADS = 4  # = max_associations: the most studies the flows can run at once
INCOMPLETE: list[str] = []  # transfer scenarios whose destination missed instances
TARGET = 0.10  # at most 10 % of the flow's wall time outside DICOM work


# ------------------------------------------------------------------------------ the lab


def study_specs(n: int) -> list[StudySpec]:
    """``n`` small studies: distinct patients and accessions, dates over one year."""
    specs = []
    for i in range(n):
        day = 1 + (i * 7) % 365
        month, mday = _month_day(day)
        specs.append(StudySpec(
            patient_id=f"BP{i:06d}", patient_name=f"Batch^Patient{i}",
            birth_date=f"{1940 + i % 60}0{1 + i % 9}1{i % 10}",
            study_date=f"2023{month:02d}{mday:02d}", study_time=f"{8 + i % 10:02d}{i % 60:02d}00",
            accession=f"BA{i:08d}", study_description="CT Thorax",
            series=(SeriesSpec("CT", "Thorax 5.0", 1, 1 + i % 2, rows=64, columns=64),)))
    return specs


def _month_day(day_of_year: int) -> tuple[int, int]:
    lengths = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    for month, length in enumerate(lengths, start=1):
        if day_of_year <= length:
            return month, day_of_year
        day_of_year -= length
    return 12, 31


def write_nodes_file(path: Path, source: OrthancServer, dest: OrthancServer, folder: Path,
                     max_associations: int) -> Path:
    """The nodes YAML the flows load (``nodes_file=``)."""
    node = {"host": LOOPBACK, "retrieve": ["c-get"], "max_associations": max_associations}
    path.write_text(yaml.safe_dump({"ae_title": ADIT_AE, "nodes": [
        {"name": "source", "ae_title": SOURCE_AE, "port": source.dicom_port, **node},
        {"name": "destination", "ae_title": DEST_AE, "port": dest.dicom_port, **node},
        {"name": "folder", "path": str(folder)},
    ]}))
    return path


# ------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One line of the final table."""

    scenario: str
    how: str
    seconds: float
    studies: int
    instances: int = 0
    overhead: float | None = None

    def line(self) -> str:
        inst = f"{self.instances / self.seconds:8.1f}" if self.instances else f"{'':>8}"
        over = "" if self.overhead is None else (
            f"{100 * self.overhead:6.1f} %" + (" !" if self.overhead > TARGET else ""))
        return (f"{self.scenario:<9} {self.how:<36} {self.seconds:8.2f} "
                f"{self.studies / self.seconds:9.1f} {inst} {over}")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ------------------------------------------------------------------------------ scenarios


def plain_queries(conn: Connection, rows: list[BatchRow], threads: int,
                  chunk: int) -> list[dict[str, Any]]:
    """query_row over every row without Prefect: in order, or chunks over a thread pool."""
    if threads == 1:
        return [r for row in rows for r in query_row(conn, row, "study")]

    def answer(part: list[BatchRow]) -> list[dict[str, Any]]:
        return [r for row in part for r in query_row(conn, row, "study")]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [r for part in pool.map(answer, chunks(rows, chunk)) for r in part]


def plain_transfers(settings: Settings, uids: list[str], threads: int) -> int:
    """transfer_study for every study without Prefect; returns the instances transferred."""
    source = Connection(settings.server("source"), ADIT_AE)
    plan = TransferPlan(source=source, retriever=CGet(source), sink=ServerSink(Connection(
        settings.server("destination"), ADIT_AE)), destination=settings.server("destination"),
        pseudonymizer=None, gate=Gate.of(source.node), retry=RetryPolicy(0, 0.0))

    def one(uid: str) -> int:
        return transfer_study(plan, StudyJob(uid)).transferred

    if threads == 1:
        return sum(one(uid) for uid in uids)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(one, uids))


def flow_rows(state: Any) -> list[dict[str, Any]]:
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, BaseException):
        raise RuntimeError(f"flow failed: {rows}")
    return rows


def status_counts(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[str(r.get("Status"))] += 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def bench_query(csv: Path, nodes: Path, settings: Settings, n: int, out: Path) -> list[Row]:
    from flows.batch import ROWS_PER_TASK, batch_query_flow

    rows = read_batch_file(csv, "query")
    conn = Connection(settings.server("source"), ADIT_AE)

    def flow() -> Any:
        return batch_query_flow(str(csv), "source", out=str(out), level="study",
                                nodes_file=str(nodes), return_state=True)

    print(f"\nbatch query, {n} rows (warm-up: flow over {ROWS_PER_TASK * 2} rows, plain once)")
    warm = csv.with_name("warmup.csv")
    warm.write_text("\n".join(csv.read_text().splitlines()[:ROWS_PER_TASK * 2 + 1]) + "\n")
    batch_query_flow(str(warm), "source", nodes_file=str(nodes), return_state=True)
    plain_queries(conn, rows[:ROWS_PER_TASK], 1, ROWS_PER_TASK)

    t_flow, state = timed(flow)
    answers = flow_rows(state)
    print(f"  flow        {t_flow:6.2f} s  {len(answers)} result rows ({status_counts(answers)})")
    t_seq, seq = timed(lambda: plain_queries(conn, rows, 1, ROWS_PER_TASK))
    print(f"  plain x1    {t_seq:6.2f} s  ({status_counts(seq)})")
    t_par, par = timed(lambda: plain_queries(conn, rows, THREADS, ROWS_PER_TASK))
    print(f"  plain x{THREADS}    {t_par:6.2f} s  ({status_counts(par)})")
    overhead = (t_flow - t_par) / t_flow
    result = [Row("query", "batch_query_flow (4 workers)", t_flow, n, 0, overhead),
              Row("query", "query_row, no Prefect, 1 thread", t_seq, n),
              Row("query", f"query_row, no Prefect, {THREADS} thr.", t_par, n)]
    return result


def bench_transfer(csv: Path, nodes: Path, settings: Settings, uids: list[str],
                   instances: int, dest: OrthancServer) -> list[Row]:
    from flows.batch import batch_transfer_flow

    n = len(uids)

    def fresh() -> None:
        dest.clear()

    def check(what: str) -> None:
        got = dest.instance_count()
        if got != instances:
            INCOMPLETE.append(what)
            print(f"  WARNING {what}: destination holds {got} of {instances} instances")

    def flow() -> Any:
        return batch_transfer_flow(str(csv), "source", "destination", nodes_file=str(nodes),
                                   method="c-get", return_state=True)

    print(f"\nbatch transfer, {n} studies, {instances} instances, C-GET -> C-STORE "
          "(warm-up: flow over 4 studies, plain once)")
    warm = csv.with_name("warmup-transfer.csv")
    warm.write_text("\n".join(csv.read_text().splitlines()[:5]) + "\n")
    fresh()
    batch_transfer_flow(str(warm), "source", "destination", nodes_file=str(nodes),
                        method="c-get", return_state=True)
    fresh()
    plain_transfers(settings, uids[:4], 1)

    fresh()
    t_flow, state = timed(flow)
    answers = flow_rows(state)
    print(f"  flow        {t_flow:6.2f} s  ({status_counts(answers)})")
    check("flow")
    fresh()
    t_seq, moved = timed(lambda: plain_transfers(settings, uids, 1))
    print(f"  plain x1    {t_seq:6.2f} s  ({moved} instances)")
    check("plain x1")
    fresh()
    t_par, moved = timed(lambda: plain_transfers(settings, uids, THREADS))
    print(f"  plain x{THREADS}    {t_par:6.2f} s  ({moved} instances)")
    check(f"plain x{THREADS}")
    overhead = (t_flow - t_par) / t_flow
    result = [Row("transfer", "batch_transfer_flow (8 workers)", t_flow, n, instances, overhead),
              Row("transfer", "transfer_study, no Prefect, 1 thr.", t_seq, n, instances),
              Row("transfer", f"transfer_study, no Prefect, {THREADS} thr.", t_par, n,
                  instances)]
    return result


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1000, help="studies = batch query rows")
    parser.add_argument("--transfer", type=int, default=200, help="studies to transfer")
    parser.add_argument("--max-associations", type=int, default=THREADS,
                        help="max_associations of both nodes (default 4)")
    parser.add_argument("--postgres", action="store_true",
                        help="the Prefect server on a throwaway PostgreSQL (the scale-out "
                             "set-up) instead of the SQLite test server")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory(prefix="adit-batch-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        specs = study_specs(args.studies)
        t_gen, paths = timed(lambda: [p for i, s in enumerate(specs)
                                      for p in write_study(s, root / "studies" / str(i))])
        source = OrthancServer(root / "orthanc1", ae_title=SOURCE_AE, dicomweb=False,
                               name="orthanc1")
        dest = OrthancServer(root / "orthanc2", ae_title=DEST_AE, dicomweb=False,
                             name="orthanc2")
        stack.callback(source.stop)
        stack.callback(dest.stop)
        source.start()
        dest.start()
        t_up, loaded = timed(lambda: source.upload(paths, workers=8))
        print(f"{len(specs)} studies, {len(paths)} instances: generated in {t_gen:.1f} s, "
              f"{loaded} loaded into {SOURCE_AE} in {t_up:.1f} s")

        nodes = write_nodes_file(root / "nodes.yaml", source, dest, root / "folder",
                                 args.max_associations)
        settings = load_settings(nodes)
        query_csv = root / "query.csv"
        query_csv.write_text("StudyInstanceUID,AccessionNumber\n" + "".join(
            f"{s.study_uid},\n" if i % 2 == 0 else f",{s.accession}\n"
            for i, s in enumerate(specs)))
        chosen = specs[:args.transfer]
        transfer_csv = root / "transfer.csv"
        transfer_csv.write_text("PatientID,StudyInstanceUID\n" + "".join(
            f"{s.patient_id},{s.study_uid}\n" for s in chosen))

        t_harness = time.perf_counter()
        if args.postgres:
            stack.enter_context(prefect_on_postgres(root / "prefect-home"))
            database = "PostgreSQL"
        else:
            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            database = "SQLite"
        print(f"Prefect server on {database} up in {time.perf_counter() - t_harness:.1f} s "
              "(not timed)")

        rows = bench_query(query_csv, nodes, settings, len(specs), root / "query-result.csv")
        rows += bench_transfer(transfer_csv, nodes, settings, [s.study_uid for s in chosen],
                               sum(s.instance_count for s in chosen), dest)

        print(f"\nmax_associations {args.max_associations} per node, {os.cpu_count()} CPUs; "
              f"overhead = (flow - no-Prefect {THREADS} threads) / flow, target < "
              f"{100 * TARGET:.0f} % ('!' = missed)\n")
        print(f"{'scenario':<9} {'how':<36} {'seconds':>8} {'studies/s':>9} {'inst/s':>8} "
              f"{'overhead':>8}")
        for row in rows:
            print(row.line())
        shutil.rmtree(root / "studies", ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps({
                "database": database, "complete": not INCOMPLETE,
                **{row.scenario: {"flow": row.seconds, "overhead": row.overhead,
                                  "studies": row.studies}
                   for row in rows if row.overhead is not None}}))
    return 0 if not INCOMPLETE else 1


@contextmanager
def prefect_on_postgres(home: Path) -> Iterator[None]:
    """A throwaway PostgreSQL and a Prefect server on it (the cluster test's lab,
    tests/cluster_lab.py), as the Prefect API of the block."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.cluster_lab import PostgresServer, PrefectServer

    with ExitStack() as stack:
        pg = PostgresServer().start()
        stack.callback(pg.stop)
        # trust authentication on loopback: the superuser and its database will do
        server = PrefectServer(home, pg.url("postgres", "trust", "postgres")).start()
        stack.callback(server.stop)
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.url}))
        yield


if __name__ == "__main__":
    sys.exit(main())
