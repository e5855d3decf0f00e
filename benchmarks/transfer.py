"""Benchmark: transferring one CT study with ADIT (``transfer_study``) versus DCMTK and Orthanc.

Generates a synthetic CT study, starts a source Orthanc (``ORTHANC1``) and a destination
Orthanc (``ORTHANC2``) on loopback, loads the study into the source and times, after one
warm-up, ``--repeat`` runs of each scenario (plain Python, no Prefect):

* ADIT C-GET from the source into a folder, without and with pseudonymization;
* ADIT C-GET from the source, C-STORE to the destination, without and with pseudonymization;
* ADIT C-GET into an encrypted 7-Zip archive (copy + AES, pseudonymized; once with LZMA2);
* DCMTK ``getscu`` into a folder, ``getscu`` + ``storescu`` to the destination, and Orthanc's
  own peer transfer (``POST /modalities/ORTHANC2/store``).

Every run starts empty (a fresh folder/archive, the destination Orthanc cleared) and is
checked for completeness. Prints a table with seconds, images/s, MB/s and the ratio to the
matching DCMTK baseline, then a cProfile of one pseudonymized folder transfer and an
offline breakdown of the pseudonymization steps: the cost per instance of the pseudonymizer
(cleaning) and of the leak check every instance passes before it leaves.

Run: ``.venv/bin/python benchmarks/transfer.py [--instances 150] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import py7zr
from pydicom import dcmread, dcmwrite
from pydicom.filereader import read_file_meta_info

from adit_tasks.core import verify as verify_module
from adit_tasks.core.association import Connection, local_slot
from adit_tasks.core.config import FolderNode, ServerNode, Settings
from adit_tasks.core.instances import DicomInstance
from adit_tasks.core.options import TransferOptions
from adit_tasks.core.plan import transfer_plan
from adit_tasks.core.pseudonymize import Pseudonymizer
from adit_tasks.core.results import StudyJob
from adit_tasks.core.sinks import series_folder
from adit_tasks.core.transfer import transfer_study
from adit_tasks.core.verify import verify
from adit_tasks.lab.servers import OrthancServer, Peer, free_port
from adit_tasks.lab.synthetic import ct_study_spec, write_study

LOOPBACK = "127.0.0.1"
ADIT_AE = "ADIT"
SOURCE_AE = "ORTHANC1"
DEST_AE = "ORTHANC2"
SECRET = "benchmark-secret"
ARCHIVE_PASSWORD = "benchmark-password"
# DCMTK tools are 5-20x slower on loopback without TCP_NODELAY (Nagle + delayed ACK).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
# The targets: ADIT time may be at most 2x (3x pseudonymized) getscu's time.
TARGETS = {"ADIT PACS->folder": 0.5, "ADIT PACS->folder pseudo": 1 / 3}


@dataclass
class Result:
    """Timings of one scenario."""

    name: str
    baseline: str  # "get" (vs getscu), "get+store" (vs getscu + storescu), "" (is a baseline)
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    same_syntax: bool | None = None  # every arrived instance in the source's syntax (ADIT rows)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Lab:
    """The running servers, ADIT settings and the study under test."""

    root: Path
    source: OrthancServer
    dest: OrthancServer
    settings: Settings
    study_uid: str
    paths: list[Path]
    dcmtk_pdu: int

    @property
    def expected(self) -> int:
        return len(self.paths)

    def conn(self, node: str) -> Connection:
        return Connection(self.settings.server(node), ADIT_AE)

    def fresh_dir(self, name: str) -> Path:
        out = self.root / "out" / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out


# A scenario: prepare (untimed) -> state, run (timed), then count what arrived (untimed).
Prepare = Callable[[], object]
Run = Callable[[object], float | None]  # returns its own time if it is a sum of steps
Count = Callable[[object], int]
# The transfer syntaxes of what arrived (ADIT rows; checked after the last run, untimed).
Syntaxes = Callable[[object], set[str]]


def measure(result: Result, prepare: Prepare, run: Run, count: Count, repeat: int,
            warmup: bool = True, syntaxes: Syntaxes | None = None,
            source_syntaxes: frozenset[str] = frozenset()) -> Result:
    """One warm-up (unless ``warmup`` is false), then ``repeat`` timed runs."""
    for i in range(repeat + (1 if warmup else 0)):
        state = prepare()
        start = time.perf_counter()
        own = run(state)
        elapsed = own if own is not None else time.perf_counter() - start
        received = count(state)
        if syntaxes is not None and i == repeat + (1 if warmup else 0) - 1:
            result.same_syntax = syntaxes(state) == set(source_syntaxes)
        if warmup and i == 0:
            continue
        result.times.append(elapsed)
        result.counts.append(received)
    print(f"  {result.name:<34} median {result.median:6.2f} s  "
          f"(runs: {', '.join(f'{t:.2f}' for t in result.times)})", flush=True)
    return result


# ---------------------------------------------------------------------------- scenarios


def count_files(folder: Path) -> int:
    """Complete ``.dcm`` files under ``folder`` (temporary ``.part`` files excluded)."""
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".part"))


def adit_transfer(lab: Lab, target: ServerNode | FolderNode, options: TransferOptions) -> None:
    """One study by C-GET through the public entry points a flow's edge and task use
    (`transfer_plan`, `transfer_study`), without Prefect; an archive is finished after."""
    settings = lab.settings
    jobs = [StudyJob(lab.study_uid)]
    with transfer_plan(settings.server("source"), target, options, jobs,
                       calling_ae=settings.ae_title, receiver=settings.receiver,
                       retry=settings.retry, method="c-get", pseudonym_secret=SECRET,
                       archive_password=ARCHIVE_PASSWORD, slot=local_slot) as plan:
        transfer_study(plan, jobs[0])
        if plan.archive is not None:
            plan.archive.finish()


def folder_node(path: Path) -> FolderNode:
    return FolderNode(name="folder", path=path)


def file_syntaxes(folder: Path) -> set[str]:
    return {str(read_file_meta_info(p).TransferSyntaxUID) for p in folder.rglob("*.dcm")}


def adit_folder(lab: Lab, pseudonymize: bool) -> tuple[Prepare, Run, Count, Syntaxes]:
    def prepare() -> Path:
        return lab.fresh_dir("adit-folder")

    def run(out: object) -> None:
        assert isinstance(out, Path)
        adit_transfer(lab, folder_node(out), TransferOptions(pseudonymize=pseudonymize))

    return (prepare, run, lambda out: count_files(out),  # type: ignore[arg-type]
            lambda out: file_syntaxes(out))  # type: ignore[arg-type]


def orthanc_syntaxes(server: OrthancServer) -> set[str]:
    """The transfer syntax Orthanc recorded for every instance it holds."""
    return {server.client.get(f"/instances/{i}/metadata/TransferSyntax").text.strip()
            for i in server.client.get("/instances").json()}


def adit_pacs(lab: Lab, pseudonymize: bool) -> tuple[Prepare, Run, Count, Syntaxes]:
    def prepare() -> None:
        lab.dest.clear()

    def run(_: object) -> None:
        adit_transfer(lab, lab.settings.server("dest"),
                      TransferOptions(pseudonymize=pseudonymize))

    return (prepare, run, lambda _: lab.dest.instance_count(),
            lambda _: orthanc_syntaxes(lab.dest))


def adit_archive(lab: Lab, compress: bool) -> tuple[Prepare, Run, Count, Syntaxes]:
    def prepare() -> Path:
        return lab.fresh_dir("adit-archive")

    def run(out: object) -> None:
        assert isinstance(out, Path)
        adit_transfer(lab, folder_node(out),
                      TransferOptions(pseudonymize=True, archive=True, compress=compress))

    def archive(out: object) -> Path:
        assert isinstance(out, Path)
        return next(out.glob("*.7z"))

    def count(out: object) -> int:
        with py7zr.SevenZipFile(archive(out), "r", password=ARCHIVE_PASSWORD) as seven:
            return sum(1 for info in seven.list()
                       if not info.is_directory and info.filename.endswith(".dcm"))

    def syntaxes(out: object) -> set[str]:
        unpacked = lab.fresh_dir("adit-archive-unpacked")
        with py7zr.SevenZipFile(archive(out), "r", password=ARCHIVE_PASSWORD) as seven:
            seven.extractall(path=unpacked)
        return file_syntaxes(unpacked)

    return prepare, run, count, syntaxes


def run_tool(cmd: list[str]) -> None:
    """Run a DCMTK tool with TCP_NODELAY; raise with its stderr if it fails."""
    proc = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")


def getscu_cmd(lab: Lab, out: Path) -> list[str]:
    return ["getscu", "-aet", ADIT_AE, "-aec", SOURCE_AE, "-pdu", str(lab.dcmtk_pdu),
            LOOPBACK, str(lab.source.dicom_port), "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={lab.study_uid}",
            "-od", str(out)]


def dcmtk_get(lab: Lab) -> tuple[Prepare, Run, Count]:
    def prepare() -> Path:
        return lab.fresh_dir("getscu")

    def run(out: object) -> None:
        run_tool(getscu_cmd(lab, out))  # type: ignore[arg-type]

    return prepare, run, lambda out: count_files(out)  # type: ignore[arg-type]


def dcmtk_get_store(lab: Lab) -> tuple[Prepare, Run, Count]:
    def prepare() -> Path:
        lab.dest.clear()
        return lab.fresh_dir("getscu-storescu")

    def run(out: object) -> float:
        assert isinstance(out, Path)
        t0 = time.perf_counter()
        run_tool(getscu_cmd(lab, out))
        t1 = time.perf_counter()
        run_tool(["storescu", "-aet", ADIT_AE, "-aec", DEST_AE, "-pdu", str(lab.dcmtk_pdu),
                  LOOPBACK, str(lab.dest.dicom_port), "+sd", str(out)])
        return (t1 - t0) + (time.perf_counter() - t1)

    return prepare, run, lambda _: lab.dest.instance_count()


def orthanc_peer(lab: Lab) -> tuple[Prepare, Run, Count]:
    resp = lab.source.client.post("/tools/lookup", content=lab.study_uid)
    resp.raise_for_status()
    study_id = next(r["ID"] for r in resp.json() if r["Type"] == "Study")

    def prepare() -> None:
        lab.dest.clear()

    def run(_: object) -> None:
        lab.source.client.post(f"/modalities/{DEST_AE}/store",
                               json={"Resources": [study_id], "Synchronous": True},
                               timeout=600).raise_for_status()
        deadline = time.monotonic() + 60
        while lab.dest.instance_count() < lab.expected and time.monotonic() < deadline:
            time.sleep(0.01)

    return prepare, run, lambda _: lab.dest.instance_count()


# ---------------------------------------------------------------------------- profiling


@contextmanager
def profiled_threads() -> Iterator[tuple[cProfile.Profile, list[cProfile.Profile]]]:
    """cProfile the block (main thread) and every thread started in it (pynetdicom, stream)."""
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(thread: threading.Thread) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            original(thread)
        finally:
            prof.disable()

    main = cProfile.Profile()
    threading.Thread.run = run  # type: ignore[method-assign]
    main.enable()
    try:
        yield main, profiles
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]


def _where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    return f"{'/'.join(Path(filename).parts[-2:])}:{line}({name})" if line else name


def profile_pseudonymized_folder(lab: Lab, top: int = 15) -> None:
    """cProfile one pseudonymized PACS->folder transfer; print where the time goes."""
    out = lab.fresh_dir("profile")
    start = time.perf_counter()
    with profiled_threads() as (main, threads):
        adit_transfer(lab, folder_node(out), TransferOptions(pseudonymize=True))
    wall = time.perf_counter() - start
    ok = count_files(out)
    stats = pstats.Stats(main)
    entries = stats.stats  # type: ignore[attr-defined]
    print(f"\nProfile: PACS->folder pseudonymized, one run, {ok}/{lab.expected} files, "
          f"{wall:.2f} s wall under cProfile (profiling slows Python code down).")
    print(f"Main thread (transfer_study: C-FIND, stream consumer, pseudonymize, sink), "
          f"top {top} by cumulative time:")
    print(f"  {'cumtime':>8} {'tottime':>8} {'calls':>7}  function")
    rows = sorted(((v[3], v[2], v[1], _where(k)) for k, v in entries.items()),
                  key=lambda r: -r[0])
    for cumtime, tottime, ncalls, where in rows[:top]:
        print(f"  {cumtime:8.3f} {tottime:8.3f} {ncalls:7d}  {where}")

    def cum(name: str) -> tuple[float, int]:
        """Largest cumulative time of ``file.py(function)`` (line numbers ignored)."""
        file, _, func = name.rpartition("(")
        hits = [(v[3], v[1]) for k, v in entries.items()
                if k[2] == func.rstrip(")") and k[0].endswith(file)]
        return max(hits) if hits else (0.0, 0)

    total, _ = cum("pseudonymize.py(pseudonymize)")
    print("Pseudonymization steps (cumulative, main thread; % of pseudonymize()):")
    for label, name in [
        ("Pseudonymizer.pseudonymize", "pseudonymize.py(pseudonymize)"),
        ("  part10.split (header parse, pixel span)", "part10.py(split)"),
        ("  _pseudonymize_parts", "pseudonymize.py(_pseudonymize_parts)"),
        ("    _collect (identifying values)", "pseudonymize.py(_collect)"),
        ("    _clean", "pseudonymize.py(_clean)"),
        ("      Rules.action (rule lookup)", "deid_rules.py(action)"),
        ("      _replace_uids", "pseudonymize.py(_replace_uids)"),
        ("        Pseudonymizer.uid (HMAC)", "pseudonymize.py(uid)"),
        ("      _keep (text, dates, numbers)", "pseudonymize.py(_keep)"),
        ("        scrub.scrub", "scrub.py(scrub)"),
        ("    _declare", "pseudonymize.py(_declare)"),
        ("  part10.join (dcmwrite + pixel splice)", "part10.py(join)"),
        ("  verify (leak check)", "verify.py(verify)"),
        ("    _check_elements (parse, only on a candidate)", "verify.py(_check_elements)"),
        ("  DicomInstance.from_dataset_header", "instances.py(from_dataset_header)"),
        ("series_folder (dcmread header again)", "sinks.py(series_folder)"),
        ("write_atomically", "folder.py(write_atomically)"),
    ]:
        value, calls = cum(name)
        share = f"{100 * value / total:5.1f} %" if total and label.startswith(" ") else ""
        print(f"  {value:8.3f} {calls:7d}  {label:<48} {share}")
    merged = pstats.Stats(main)
    for prof in threads:
        with contextlib.suppress(TypeError):
            merged.add(prof)
    recv = [(v[3], v[1]) for k, v in merged.stats.items()  # type: ignore[attr-defined]
            if _where(k).endswith("(from_bytes)")]
    if recv:
        print(f"  {max(recv)[0]:8.3f} {max(recv)[1]:7d}  DicomInstance.from_bytes "
              f"(receiving thread, header parse)")


def offline_breakdown(lab: Lab) -> None:
    """Time each pseudonymization step on the study in memory (no network, no profiler),
    the leak check on its own, and the leak check's element-by-element path for comparison."""
    blobs = [p.read_bytes() for p in lab.paths]
    instances = [DicomInstance.from_bytes(b) for b in blobs]
    p = Pseudonymizer(SECRET)
    p.pseudonymize(instances[0])  # warm the caches (profile table, UID dictionary, patterns)
    n = len(blobs)

    def timed(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    t_full = timed(lambda: [p.pseudonymize(i) for i in instances])
    unverified = [p.pseudonymize_unverified(i) for i in instances]
    t_clean = timed(lambda: [p.pseudonymize_unverified(i) for i in instances])
    t_verify = timed(lambda: [verify(out.data, evidence, pixel)
                              for out, evidence, pixel in unverified])
    t_slow = timed(lambda: [verify_module._check_elements(out.data, evidence)
                            for out, evidence, _ in unverified])
    datasets = [dcmread(io.BytesIO(b)) for b in blobs]
    t_read = timed(lambda: [dcmread(io.BytesIO(b)) for b in blobs])
    t_ds = timed(lambda: [p.pseudonymize_dataset(ds) for ds in datasets])

    def write_all() -> None:
        for ds in datasets:
            dcmwrite(io.BytesIO(), ds, enforce_file_format=True)

    t_write = timed(write_all)
    t_series = timed(lambda: [series_folder(i, True) for i in instances])
    t_header = timed(lambda: [DicomInstance.from_bytes(b) for b in blobs])
    print(f"\nOffline, {n} instances in memory (ms per instance):")
    for label, t in [("Pseudonymizer.pseudonymize (cleaning + leak check)", t_full),
                     ("  cleaning (pseudonymize_unverified)", t_clean),
                     ("  leak check (verify)", t_verify),
                     ("  (leak check element by element, for comparison)", t_slow),
                     ("dcmread full data set", t_read),
                     ("pseudonymize_dataset (in place, no check)", t_ds),
                     ("dcmwrite", t_write),
                     ("series_folder (header re-parse per file)", t_series),
                     ("DicomInstance.from_bytes (header parse)", t_header)]:
        print(f"  {1000 * t / n:7.2f}  {label}")


# ---------------------------------------------------------------------------- output


def print_table(results: list[Result], expected: int, nbytes: int) -> bool:
    base = {"get": next(r for r in results if r.name == "DCMTK getscu"),
            "get+store": next(r for r in results if r.name == "DCMTK getscu+storescu")}
    header = (f"{'scenario':<34} {'median s':>8} {'img/s':>6} {'MB/s':>6} {'complete':>9} "
              f"{'vs DCMTK':>9} {'target':>12}")
    print(header)
    print("-" * len(header))
    complete = True
    for r in results:
        got = min(r.counts)
        complete &= got == expected and max(r.counts) == expected
        ratio = target = ""
        if r.baseline:
            value = base[r.baseline].median / r.median
            ratio = f"{value:.2f}"
            if r.name in TARGETS:
                goal = TARGETS[r.name]
                target = f">= {goal:.2f} " + ("ok" if value >= goal else "MISS")
        print(f"{r.name:<34} {r.median:>8.2f} {expected / r.median:>6.0f} "
              f"{nbytes / 1e6 / r.median:>6.1f} {f'{got}/{expected}':>9} {ratio:>9} "
              f"{target:>12}")
    print("\nmedian of the timed runs (LZMA row: a single run); img/s and MB/s from the median, "
          "MB = 10^6 bytes of the source study's Part 10 files; complete = fewest files/"
          "instances at the destination in any run / study size; vs DCMTK = DCMTK median / "
          "scenario median (folder and archive rows vs getscu, PACS rows vs getscu+storescu).")
    return complete


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=150, help="CT slices (512x512x16)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--dcmtk-pdu", type=int, default=131072,
                        help="getscu/storescu max receive PDU (DCMTK default 16384)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    parser.add_argument("--no-lzma", action="store_true", help="skip the LZMA2 archive run")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="adit-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        spec = ct_study_spec(args.instances)
        t0 = time.perf_counter()
        paths = write_study(spec, root / "study")
        nbytes = sum(p.stat().st_size for p in paths)
        print(f"study {spec.study_uid}: {len(paths)} instances, {nbytes / 1e6:.1f} MB "
              f"(generated in {time.perf_counter() - t0:.1f} s)")

        dest = OrthancServer(root / "orthanc2", ae_title=DEST_AE, dicomweb=False,
                             name="orthanc2")
        # The source knows ADIT's receiver (C-MOVE destination, unused by C-GET) and ORTHANC2.
        source = OrthancServer(root / "orthanc1", ae_title=SOURCE_AE, dicomweb=False,
                               peers=[Peer(ADIT_AE, LOOPBACK, free_port())], name="orthanc1")
        stack.callback(source.stop)
        stack.callback(dest.stop)
        # OrthancServer sets TCP_NODELAY=1 for Orthanc's DICOM side (see its start()).
        source.start()
        dest.start()
        # registered at runtime under its AE title: POST /modalities/ORTHANC2/store
        source.add_peer(Peer(DEST_AE, LOOPBACK, dest.dicom_port))
        modalities = source.client.get("/modalities").json()
        print(f"loaded into {SOURCE_AE}: {source.upload(paths)}; its modalities: {modalities}")

        settings = Settings(ae_title=ADIT_AE, receiver_port=source.peers[0].port,
                            receiver_host=LOOPBACK, nodes=[
                                {"name": "source", "ae_title": SOURCE_AE, "host": LOOPBACK,
                                 "port": source.dicom_port, "retrieve": ["c-get"]},
                                {"name": "dest", "ae_title": DEST_AE, "host": LOOPBACK,
                                 "port": dest.dicom_port, "retrieve": ["c-get"]}])
        lab = Lab(root, source, dest, settings, spec.study_uid, paths, args.dcmtk_pdu)
        source_syntaxes = frozenset(str(read_file_meta_info(p).TransferSyntaxUID)
                                    for p in paths)

        def adit(name: str, baseline: str, scenario: tuple[Prepare, Run, Count, Syntaxes],
                 repeat: int = args.repeat, warmup: bool = True) -> Result:
            prepare, run, count, syntaxes = scenario
            return measure(Result(name, baseline), prepare, run, count, repeat, warmup,
                           syntaxes, source_syntaxes)

        print(f"\n{args.repeat} timed runs after 1 warm-up each:")
        results = [
            measure(Result("DCMTK getscu", ""), *dcmtk_get(lab), args.repeat),
            measure(Result("DCMTK getscu+storescu", ""), *dcmtk_get_store(lab), args.repeat),
            measure(Result("Orthanc peer store (REST)", ""), *orthanc_peer(lab), args.repeat),
            adit("ADIT PACS->folder", "get", adit_folder(lab, False)),
            adit("ADIT PACS->folder pseudo", "get", adit_folder(lab, True)),
            adit("ADIT PACS->PACS", "get+store", adit_pacs(lab, False)),
            adit("ADIT PACS->PACS pseudo", "get+store", adit_pacs(lab, True)),
            adit("ADIT PACS->archive pseudo", "get", adit_archive(lab, False)),
        ]
        if not args.no_lzma:
            results.append(adit("ADIT PACS->archive pseudo LZMA2", "get",
                                adit_archive(lab, True), 1, warmup=False))

        print(f"\n{args.instances} instances, {nbytes / 1e6:.1f} MB\n")
        complete = print_table(results, lab.expected, nbytes)
        same = all(r.same_syntax is not False for r in results)
        print("completeness: " + ("every scenario delivered every instance" if complete
                                  else "SOME SCENARIOS MISSED INSTANCES")
              + "; syntax: " + ("every ADIT scenario kept the source's transfer syntax"
                                if same else "SOME SCENARIOS CHANGED THE TRANSFER SYNTAX"))
        if args.json:
            args.json.write_text(json.dumps({"expected": lab.expected, "scenarios": {
                r.name: {"median": r.median, "runs": r.times, "fewest": min(r.counts),
                         "complete": min(r.counts) == max(r.counts) == lab.expected,
                         "same_syntax": r.same_syntax} for r in results}}))
        complete = complete and same
        if not args.no_profile:
            profile_pseudonymized_folder(lab)
            offline_breakdown(lab)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
