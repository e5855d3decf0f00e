"""Benchmark: retrieving one CT study with ADIT (C-GET, C-MOVE, WADO-RS) versus DCMTK.

Generates a synthetic CT study, starts a real Orthanc and a DCMTK dcmqrscp on loopback, loads
the study into both and times each retrieval method (one warm-up, then ``--repeat`` runs),
writing every received instance to a file as DCMTK's ``getscu``/``movescu`` do. Prints a table
with seconds, images/s, MB/s, instance counts and the ADIT/DCMTK speed ratio.

Run: ``.venv/bin/python benchmarks/retrieve.py [--instances 150] [--repeat 3] [--profile]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
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

from pydicom.filereader import read_file_meta_info

from adit_tasks.core.association import Connection
from adit_tasks.core.config import RetrieveMethod, Settings
from adit_tasks.core.find import manifest
from adit_tasks.core.receiver import Receiver, open_receiver
from adit_tasks.core.retrieve import make_retriever
from adit_tasks.lab.servers import DcmqrscpServer, OrthancServer, Peer, free_port
from adit_tasks.lab.synthetic import ct_study_spec, write_study

LOOPBACK = "127.0.0.1"
ADIT_AE = "ADIT"
MOVESCU_AE = "MOVESCU"
TARGET_RATIO = 0.5
# DCMTK tools are 5-20x slower on loopback without TCP_NODELAY (Nagle + delayed ACK).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Target:
    """One PACS under test, as ADIT and the DCMTK tools address it."""

    name: str  # node name in the ADIT settings
    ae_title: str
    port: int
    methods: list[RetrieveMethod]
    dicomweb_url: str | None = None


@dataclass
class Result:
    """Timings of one (server, method) pair."""

    server: str
    method: str
    family: str  # "get" or "move" (what ADIT is compared with); "" for no counterpart
    tool: str  # "ADIT" or "DCMTK"
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    nbytes: int = 0
    syntaxes: set[str] = field(default_factory=set)  # of every instance ADIT received

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


# ---------------------------------------------------------------------------- retrievals


def adit_run(settings: Settings, node: str, study_uid: str, method: RetrieveMethod,
             sop_classes: set[str] | None, out: Path, receiver: Receiver,
             syntaxes: set[str]) -> tuple[int, int]:
    """Retrieve the study with ADIT, writing each instance to ``out``; (files, bytes). The
    transfer syntax of every instance is added to ``syntaxes``."""
    retriever = make_retriever(Connection(settings.server(node), ADIT_AE), method, receiver)
    count = nbytes = 0
    with retriever.retrieve(study_uid, (), frozenset(sop_classes or ())) as stream:
        for instance in stream:
            (out / f"{instance.sop_instance_uid}.dcm").write_bytes(instance.data)
            syntaxes.add(instance.transfer_syntax_uid)
            count += 1
            nbytes += len(instance.data)
    return count, nbytes


def dcmtk_run(cmd: list[str], out: Path) -> tuple[int, int]:
    """Run a DCMTK tool that writes files into ``out``; (files, bytes)."""
    proc = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    files = [p for p in out.iterdir() if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def getscu_cmd(target: Target, study_uid: str, out: Path, pdu: int) -> list[str]:
    return ["getscu", "-aet", ADIT_AE, "-aec", target.ae_title, "-pdu", str(pdu),
            LOOPBACK, str(target.port), "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
            "-od", str(out)]


def movescu_cmd(target: Target, study_uid: str, out: Path, port: int, pdu: int) -> list[str]:
    return ["movescu", "-aet", MOVESCU_AE, "-aem", MOVESCU_AE, "-aec", target.ae_title,
            "--port", str(port), "-pdu", str(pdu), LOOPBACK, str(target.port), "-S",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
            "-od", str(out)]


def measure(result: Result, run: Callable[[Path], tuple[int, int]], scratch: Path,
            repeat: int) -> Result:
    """One warm-up, then ``repeat`` timed runs, each into an empty directory."""
    for i in range(repeat + 1):
        out = scratch / f"{result.server}-{result.method}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        count, nbytes = run(out)
        elapsed = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        if i == 0:
            continue  # warm-up
        result.times.append(elapsed)
        result.counts.append(count)
        result.nbytes = nbytes
    return result


# ---------------------------------------------------------------------------- profiling


# Built-ins whose time is waiting (for the peer, a queue or a polling loop), not work.
_WAITS = ("acquire' of '_thread.lock", "time.sleep", "select.select", "'recv' of", "'send' of")


@contextmanager
def profiled(title: str, top: int = 15) -> Iterator[None]:
    """cProfile the block and every thread started in it; print the top entries.

    pynetdicom's reactors and the stream run in their own threads, which a plain cProfile
    would not see, so ``threading.Thread.run`` is wrapped while the block runs.
    """
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
        yield
    finally:
        main.disable()
        threading.Thread.run = original  # type: ignore[method-assign]
    stats = pstats.Stats(main)
    for prof in profiles:
        with contextlib.suppress(TypeError):  # a thread still running has no stats yet
            stats.add(prof)
    entries = stats.stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in entries.items():
        where = f"{'/'.join(Path(filename).parts[-2:])}:{line}({name})" if line else name
        rows.append((tottime, cumtime, ncalls, where))
    waits = sum(r[0] for r in rows if any(w in r[3] for w in _WAITS))
    work = sum(r[0] for r in rows) - waits
    print(f"\nProfile {title} (cProfile, all threads; profiling slows it down): "
          f"{work:.2f} s work, {waits:.2f} s waiting/socket I/O summed over threads")
    print(f"  {'tottime':>8} {'cumtime':>8} {'calls':>7}  function (by own time, waits excluded)")
    busy = sorted((r for r in rows if not any(w in r[3] for w in _WAITS)), reverse=True)
    for tottime, cumtime, ncalls, where in busy[:top]:
        print(f"  {tottime:8.3f} {cumtime:8.3f} {ncalls:7d}  {where}")
    print(f"  {'':>8} {'cumtime':>8} {'calls':>7}  ADIT / pynetdicom entry points")
    keys = ("on_store", "_on_store", "from_bytes", "encoded_dataset", "write_bytes",
            "_read_pdu_data", "do_action", "events.py:297(trigger)", "iter_multipart")
    for _, cumtime, ncalls, where in sorted(rows, key=lambda r: -r[1]):
        if any(f"({k})" in where or k in where for k in keys):
            print(f"  {'':>8} {cumtime:8.3f} {ncalls:7d}  {where}")


# ---------------------------------------------------------------------------- output


def print_table(results: list[Result], expected: int) -> None:
    dcmtk = {(r.server, r.family): r for r in results if r.tool == "DCMTK"}
    header = (f"{'server':<9} {'method':<15} {'best s':>7} {'median s':>9} {'img/s':>7} "
              f"{'MB/s':>7} {'received':>9} {'ADIT/DCMTK':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        rate = r.counts[-1] / r.median
        mbs = r.nbytes / 1e6 / r.median
        received = f"{min(r.counts)}/{expected}"
        ratio = ""
        base = dcmtk.get((r.server, r.family))
        if r.tool == "ADIT" and base is not None:
            value = base.median / r.median
            ratio = f"{value:.2f}" + ("" if value >= TARGET_RATIO else " !")
        print(f"{r.server:<9} {r.method:<15} {r.best:>7.2f} {r.median:>9.2f} {rate:>7.0f} "
              f"{mbs:>7.1f} {received:>9} {ratio:>11}")
    print(f"\nimg/s, MB/s and ADIT/DCMTK use the median; ADIT/DCMTK = DCMTK time / ADIT time "
          f"for the same server (C-GET vs getscu, C-MOVE vs movescu); target >= {TARGET_RATIO}"
          f" ('!' = below). MB = 10^6 bytes of received Part 10 files.")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=150, help="CT slices (512x512x16)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--dcmtk-pdu", type=int, default=131072,
                        help="getscu/movescu max receive PDU (DCMTK default 16384, max 131072)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one extra run of each ADIT method")
    parser.add_argument("--orthanc-only", action="store_true", help="leave out dcmqrscp")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="adit-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        spec = ct_study_spec(args.instances)
        study_uid = spec.study_uid
        t0 = time.perf_counter()
        paths = write_study(spec, root / "study")
        size = sum(p.stat().st_size for p in paths)
        print(f"study {study_uid}: {len(paths)} instances, {size / 1e6:.1f} MB "
              f"(generated in {time.perf_counter() - t0:.1f} s)")

        receiver_port, movescu_port = free_port(), free_port()
        peers = [Peer(ADIT_AE, LOOPBACK, receiver_port), Peer(MOVESCU_AE, LOOPBACK, movescu_port)]
        orthanc = OrthancServer(root / "orthanc", ae_title="ORTHANC1", dicomweb=True, peers=peers)
        dcmqr = DcmqrscpServer(root / "dcmqrscp", ae_title="DCMQR", peers=peers)
        stack.callback(orthanc.stop)
        stack.callback(dcmqr.stop)
        # the in-process C-MOVE receiver, as a job would open it
        receiver = stack.enter_context(open_receiver(ADIT_AE, LOOPBACK, receiver_port))
        orthanc.start()
        dcmqr.start()
        loaded = orthanc.upload(paths), dcmqr.load(paths)
        print(f"loaded: orthanc {loaded[0]}, dcmqrscp {loaded[1]}")

        targets = [
            Target("orthanc", orthanc.ae_title, orthanc.dicom_port,
                   ["c-get", "c-move", "wado-rs"], orthanc.dicomweb_url),
            Target("dcmqrscp", dcmqr.ae_title, dcmqr.port, ["c-get", "c-move"]),
        ][:1 if args.orthanc_only else 2]
        nodes = [{"name": t.name, "ae_title": t.ae_title, "host": LOOPBACK, "port": t.port,
                  "retrieve": t.methods, "dicomweb_url": t.dicomweb_url} for t in targets]
        settings = Settings(ae_title=ADIT_AE, receiver_port=receiver_port,
                            receiver_host=LOOPBACK, nodes=nodes)

        scratch = root / "out"
        results: list[Result] = []
        families = {"c-get": "get", "c-move": "move", "wado-rs": ""}
        for target in targets:
            conn = Connection(settings.server(target.name), ADIT_AE)
            found = manifest(conn, study_uid)
            print(f"{target.name}: C-FIND lists {len(found)} instances")
            sop_classes = found.sop_classes or None
            for method in target.methods:
                result = Result(target.name, f"ADIT {method.upper()}", families[method], "ADIT")

                def adit(out: Path, t: Target = target, m: RetrieveMethod = method,
                         classes: set[str] | None = sop_classes,
                         seen: set[str] = result.syntaxes) -> tuple[int, int]:
                    return adit_run(settings, t.name, study_uid, m, classes, out, receiver,
                                    seen)

                label = result.method
                results.append(measure(result, adit, scratch, args.repeat))
                if args.profile:
                    out = scratch / "profile"
                    out.mkdir(parents=True, exist_ok=True)
                    with profiled(f"{target.name} {label}"):
                        adit(out)
                    shutil.rmtree(out)
            results.append(measure(
                Result(target.name, "DCMTK getscu", "get", "DCMTK"),
                lambda out, t=target: dcmtk_run(getscu_cmd(t, study_uid, out, args.dcmtk_pdu),
                                                out),
                scratch, args.repeat))
            results.append(measure(
                Result(target.name, "DCMTK movescu", "move", "DCMTK"),
                lambda out, t=target: dcmtk_run(
                    movescu_cmd(t, study_uid, out, movescu_port, args.dcmtk_pdu), out),
                scratch, args.repeat))

        print(f"\n{args.instances} instances, {args.repeat} timed runs after 1 warm-up "
              f"per method\n")
        print_table(results, len(paths))
        complete = all(min(r.counts) == len(paths) for r in results)
        source_syntaxes = {str(read_file_meta_info(p).TransferSyntaxUID) for p in paths}
        same = all(r.syntaxes == source_syntaxes for r in results if r.tool == "ADIT")
        print("completeness: " + ("all methods received every instance" if complete
                                  else "SOME METHODS MISSED INSTANCES")
              + "; syntax: " + ("ADIT received every instance in the stored syntax" if same
                                else "ADIT RECEIVED ANOTHER SYNTAX"))
        if args.json:
            args.json.write_text(json.dumps({"expected": len(paths), "results": [
                {"server": r.server, "method": r.method, "tool": r.tool, "median": r.median,
                 "runs": r.times, "fewest": min(r.counts),
                 "complete": min(r.counts) == max(r.counts) == len(paths),
                 "same_syntax": r.syntaxes == source_syntaxes if r.tool == "ADIT" else None}
                for r in results]}))
    return 0 if complete and same else 1


if __name__ == "__main__":
    sys.exit(main())
