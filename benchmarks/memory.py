"""Benchmark: peak memory of transferring a 1 GB study (C-GET, C-MOVE, WADO-RS) to a folder.

Generates a synthetic CT study of ``--instances`` slices (2,000 x ~0.53 MB = 1.05 GB), loads it
into a real Orthanc (with DICOMweb) on loopback, and transfers it to a fresh folder once per
method, each time in a child process of its own (`transfer_plan` + `transfer_study`, as a
flow's task does, without Prefect). The child reports its peak resident set size (the
kernel's high-water mark, ``ru_maxrss``), so the figure is the whole process: interpreter,
libraries and the study passing through. Then every written file is counted and its transfer
syntax compared with the source's. Target: under 300 MB whatever the method.

Run: ``.venv/bin/python benchmarks/memory.py [--instances 2000] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml
from pydicom.filereader import read_file_meta_info

from adit_tasks.lab.servers import OrthancServer, Peer, free_port
from adit_tasks.lab.synthetic import ct_study_spec, write_study

METHODS = ("c-get", "c-move", "wado-rs")
TARGET_MB = 300


def child(nodes: Path, study_uid: str, method: str) -> None:
    """In the child process: one transfer to the folder node; prints its figures as JSON."""
    from adit_tasks.core.association import local_slot
    from adit_tasks.core.config import load_settings
    from adit_tasks.core.options import TransferOptions
    from adit_tasks.core.plan import transfer_plan
    from adit_tasks.core.results import StudyJob
    from adit_tasks.core.transfer import transfer_study

    settings = load_settings(nodes)
    jobs = [StudyJob(study_uid)]
    start = time.perf_counter()
    with transfer_plan(settings.server("pacs"), settings.node("downloads"), TransferOptions(),
                       jobs, calling_ae=settings.ae_title, receiver=settings.receiver,
                       retry=settings.retry, method=method, slot=local_slot) as plan:  # type: ignore[arg-type]
        result = transfer_study(plan, jobs[0])
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    status = Path("/proc/self/status").read_text()
    hwm = next((int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmHWM:")), peak_kb)
    peak_kb = max(peak_kb, hwm)
    print(json.dumps({"seconds": seconds, "peak_mb": peak_kb / 1024,
                      "transferred": result.transferred, "status": str(result.status)}))


def syntaxes(folder: Path) -> tuple[int, set[str]]:
    """The number of `.dcm` files under `folder` and their transfer syntaxes."""
    files = list(folder.rglob("*.dcm"))
    return len(files), {str(read_file_meta_info(p).TransferSyntaxUID) for p in files}


def measure(instances: int) -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="adit-mem-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        spec = ct_study_spec(instances)
        t0 = time.perf_counter()
        paths = write_study(spec, root / "study")
        nbytes = sum(p.stat().st_size for p in paths)
        source_syntaxes = {str(read_file_meta_info(p).TransferSyntaxUID) for p in paths[:20]}
        receiver_port = free_port()
        orthanc = OrthancServer(root / "orthanc", ae_title="PACS", dicomweb=True,
                                peers=[Peer("ADIT", "127.0.0.1", receiver_port)])
        stack.callback(orthanc.stop)
        orthanc.start()
        loaded = orthanc.upload(paths, workers=4)
        for p in paths:
            p.unlink()  # the study lives in Orthanc now; keep the disk free
        print(f"study: {loaded} instances, {nbytes / 1e6:.0f} MB, generated and loaded in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        folder = root / "downloads"
        nodes = root / "nodes.yaml"
        nodes.write_text(yaml.safe_dump({
            "ae_title": "ADIT", "receiver_port": receiver_port, "retries": 0, "nodes": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                 "port": orthanc.dicom_port, "dicomweb_url": orthanc.dicomweb_url,
                 "retrieve": list(METHODS), "timeout": 120},
                {"name": "downloads", "path": str(folder)}]}))
        for method in METHODS:
            proc = subprocess.run([sys.executable, __file__, "--child", method, "--nodes",
                                   str(nodes), "--study", spec.study_uid],
                                  capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"{method}: child exited {proc.returncode}:\n"
                                   f"{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            count, found = syntaxes(folder)
            figures.update(expected=loaded, files=count,
                           complete=count == loaded, same_syntax=found == source_syntaxes,
                           megabytes=nbytes / 1e6)
            results[method] = figures
            print(f"  {method:<8} peak RSS {figures['peak_mb']:6.0f} MB  "
                  f"{figures['seconds']:6.1f} s  {count}/{loaded} files, syntax "
                  f"{'same' if figures['same_syntax'] else 'DIFFERENT'}", flush=True)
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=2000, help="CT slices (~0.53 MB)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--study", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.nodes, args.study, args.child)
        return 0
    results = measure(args.instances)
    worst = max(float(r["peak_mb"]) for r in results.values())  # type: ignore[arg-type]
    print(f"\npeak RSS, worst method: {worst:.0f} MB (target < {TARGET_MB} MB: "
          f"{'ok' if worst < TARGET_MB else 'MISS'})")
    if args.json:
        args.json.write_text(json.dumps(results))
    return 0 if all(r["complete"] and r["same_syntax"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
