"""`make demo`: the main job on embedded defaults, the way a new user would try it.

Starts two local Orthanc PACS servers on loopback (the source with DICOMweb), fills the source
with generated studies, writes `.demo/nodes.yaml` for them, and then runs the `adit` commands a
user would type: list nodes, echo, query, and transfers (to a folder and PACS to PACS) as
Prefect flow runs. The PACS servers keep running afterwards so you can try more commands;
`python -m deployments.demo --stop` stops them (by the PIDs recorded in `.demo/pids`). The
local Prefect server the first transfer starts (flows/runtime.py) is stopped when the demo
ends, unless it was running before.
`--servers-only` (`make demo-servers`) starts the two PACS, fills the source, writes
`.demo/nodes.yaml` and `.demo/studies.txt` (the source's StudyInstanceUIDs) and runs nothing:
for trying a cluster of workers on them.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from adit_tasks.lab.servers import OrthancServer, Peer, free_port
from adit_tasks.lab.synthetic import ct_study_spec, demo_specs, write_study
from flows.runtime import running_server

DEMO_DIR = Path(".demo")
PIDS = DEMO_DIR / "pids.json"


def stop_previous() -> None:
    """Stop the servers a previous demo started (only those PIDs)."""
    if not PIDS.exists():
        return
    for pid in json.loads(PIDS.read_text()):
        try:
            os.killpg(pid, signal.SIGTERM)  # each server runs in its own session: pgid == pid
            print(f"stopped demo server (pid {pid})")
        except ProcessLookupError:
            pass
    PIDS.unlink()
    time.sleep(0.5)


# Demo-only secrets; real deployments set their own in the environment or Prefect Secret blocks.
DEMO_ENV = {"ADIT_PSEUDONYM_SECRET": "demo-secret-change-me", "ADIT_ARCHIVE_PASSWORD": "demo"}


def adit(*args: str) -> int:
    """Run an `adit` command as a user would, showing the command line."""
    print(f"\n$ adit {shlex.join(args)}", flush=True)
    env = {**os.environ, "ADIT_NODES_FILE": str(DEMO_DIR / "nodes.yaml"), **DEMO_ENV}
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], env=env).returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop", action="store_true", help="stop the demo servers and exit")
    parser.add_argument("--no-ui", action="store_true",
                        help="do not end with `adit serve` (the web interface)")
    parser.add_argument("--servers-only", action="store_true",
                        help="start the two demo PACS and write .demo/nodes.yaml; run nothing")
    args = parser.parse_args()
    stop_previous()
    if args.stop:
        return
    DEMO_DIR.mkdir(exist_ok=True)
    # Each demo delivers into an empty folder, so that its verification covers its own jobs.
    shutil.rmtree(DEMO_DIR / "downloads", ignore_errors=True)
    receiver_port = free_port()
    adit_peer = Peer("ADIT", "127.0.0.1", receiver_port)
    source = OrthancServer(DEMO_DIR / "pacs1", ae_title="PACS1", dicomweb=True, peers=[adit_peer])
    research = OrthancServer(DEMO_DIR / "pacs2", ae_title="PACS2", dicomweb=False,
                             peers=[adit_peer])
    for server in (source, research):
        server.start()
    PIDS.write_text(json.dumps([s.proc.pid for s in (source, research) if s.proc]))

    specs = [*demo_specs(n_patients=4, seed=1), ct_study_spec(150)]
    files = [p for spec in specs for p in write_study(spec, DEMO_DIR / "generated")]
    source.upload(files)
    print(f"Started two Orthanc PACS on loopback: pacs1 (DICOM {source.dicom_port}, "
          f"web {source.url}) with {len(specs)} generated studies, and pacs2 (DICOM "
          f"{research.dicom_port}, web {research.url}).")

    nodes = {
        "ae_title": "ADIT",
        "receiver_port": receiver_port,
        "nodes": [
            {"name": "pacs1", "ae_title": "PACS1", "host": "127.0.0.1",
             "port": source.dicom_port, "dicomweb_url": source.dicomweb_url,
             "retrieve": ["c-get", "c-move", "wado-rs"], "max_associations": 2},
            {"name": "pacs2", "ae_title": "PACS2", "host": "127.0.0.1",
             "port": research.dicom_port, "max_associations": 2},
            {"name": "downloads", "path": str((DEMO_DIR / "downloads").resolve())},
        ],
    }
    (DEMO_DIR / "nodes.yaml").write_text(yaml.safe_dump(nodes, sort_keys=False))
    (DEMO_DIR / "studies.txt").write_text("".join(f"{s.study_uid}\n" for s in specs))
    if args.servers_only:
        print(f"Nodes file: {(DEMO_DIR / 'nodes.yaml').resolve()}\n"
              f"The StudyInstanceUIDs on pacs1, one a line: {DEMO_DIR / 'studies.txt'}\n"
              "Stop the demo PACS servers:  .venv/bin/python -m deployments.demo --stop")
        return

    ct = specs[-1]
    if running_server() is None:
        # The first command that runs a flow starts the local Prefect server, kept for later
        # commands (and `adit serve` at the end): the demo stops it when it ends.
        atexit.register(adit, "server", "stop")
    failures = 0
    failures += adit("nodes") != 0
    failures += adit("echo", "pacs1") != 0
    failures += adit("query", "pacs1", "--study-date", "2018-01-01-2030-12-31") != 0
    failures += adit("query", "pacs1", "--patient-id", ct.patient_id, "--level", "series") != 0
    failures += adit("transfer", "--source", "pacs1", "--destination", "downloads",
                     "--study", ct.study_uid, "--study", specs[0].study_uid) != 0
    failures += adit("transfer", "--source", "pacs1", "--destination", "pacs2",
                     "--study", ct.study_uid, "--method", "c-move") != 0
    print("\nPseudonymized (secret and archive password from ADIT_PSEUDONYM_SECRET and "
          "ADIT_ARCHIVE_PASSWORD; the demo sets throwaway values):")
    failures += adit("transfer", "--source", "pacs1", "--destination", "downloads",
                     "--study", specs[1].study_uid, "--pseudonymize", "--trial-id", "DEMO",
                     "--trial-name", "ADIT demo trial") != 0
    failures += adit("transfer", "--source", "pacs1", "--destination", "downloads",
                     "--study", ct.study_uid, "--study", specs[0].study_uid,
                     "--pseudonymize", "--archive", "--trial-id", "DEMO") != 0
    failures += adit("transfer", "--source", "pacs1", "--destination", "pacs2",
                     "--study", specs[2].study_uid, "--pseudonym", "SUBJECT-001") != 0
    print("\nThe same pseudonymized transfer again: nothing is sent twice.")
    failures += adit("transfer", "--source", "pacs1", "--destination", "pacs2",
                     "--study", specs[2].study_uid, "--pseudonym", "SUBJECT-001") != 0
    print("\nNIfTI beside the DICOM files (dcm2niix), pseudonymized first:")
    failures += adit("transfer", "--source", "pacs1", "--destination", "downloads",
                     "--study", ct.study_uid, "--pseudonymize", "--trial-id", "DEMO",
                     "--nifti", "also") != 0
    print("\nBatch files (examples/): find studies, then transfer a list pseudonymized.")
    failures += adit("batch-query", "examples/batch_query.csv", "--source", "pacs1",
                     "--out", str(DEMO_DIR / "found.csv")) != 0
    failures += adit("batch-transfer", "examples/batch_transfer.csv", "--source", "pacs1",
                     "--destination", "downloads", "--pseudonymize",
                     "--out", str(DEMO_DIR / "transferred.csv")) != 0
    print("\nA recipient checks each delivery against its manifest (exit 0: all there, "
          "unchanged):")
    failures += adit("verify", str(DEMO_DIR / "downloads")) != 0
    for archive in sorted((DEMO_DIR / "downloads").glob("*.7z")):
        failures += adit("verify", str(archive)) != 0
    written = len(list((DEMO_DIR / "downloads").rglob("*.dcm")))
    volumes = len(list((DEMO_DIR / "downloads").rglob("*.nii.gz")))
    archives = [p.name for p in (DEMO_DIR / "downloads").glob("*.7z")]
    print(f"\nDemo done: {written} DICOM files, {volumes} NIfTI volume(s) and the "
          f"archive(s) {', '.join(archives)} in {DEMO_DIR / 'downloads'} (archive password: "
          "demo), "
          f"{research.instance_count()} instances on pacs2 ({research.url}).")
    print(f"Try more:  ADIT_NODES_FILE={DEMO_DIR}/nodes.yaml .venv/bin/adit --help")
    print("Stop the demo PACS servers:  .venv/bin/python -m deployments.demo --stop")
    if failures:
        print(f"\n{failures} demo step(s) failed (see above).")
        sys.exit(1)
    if args.no_ui:
        return
    print("\nNow the web interface. In the Prefect UI: Deployments -> pick-studies -> Run ->"
          " Custom run (source pacs1, destination downloads or pacs2, e.g. patient ID"
          f" {ct.patient_id}); open the run and press Resume to tick studies.\n")
    sys.exit(adit("serve"))


if __name__ == "__main__":
    main()
