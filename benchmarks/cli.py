"""Benchmark: `adit transfer` of a small study from the command line, as a user types it.

Starts a source Orthanc on loopback with one small study (20 instances of 64x64, ~10 KB
each), writes a nodes file with it and a folder node, and runs `adit transfer` in
subprocesses with their own Prefect home (a temporary `PREFECT_HOME`) and port
(`PREFECT_SERVER_API_PORT`), so the user's local server is never touched:

1. the first command, which finds no server and starts the local one (its start included);
2. `--repeat` commands with the server up (the target: at most 2 s of wall time each);
3. one command with `--no-server` (Prefect's ephemeral mode: a temporary server per command);

then `adit server stop`. Every command must print `success` and deliver every instance into
a fresh folder. With `--profile`, one more command runs under cProfile (top functions by
cumulative time) and `python -X importtime` (the slowest imports).

Run: ``.venv/bin/python benchmarks/cli.py [--repeat 5] [--profile] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from adit_tasks.lab.servers import OrthancServer, free_port
from adit_tasks.lab.synthetic import SeriesSpec, StudySpec, write_study

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 2.0
STUDY = StudySpec("CLI0001", "Latency^Lena", "19700101", "20240101", "080000", "ACCCLI01",
                  "CT Thorax", (SeriesSpec("CT", "Thorax", 1, 20, rows=64, columns=64),))


@dataclass
class CliResult:
    """Wall times of `adit transfer` (seconds) and whether every run delivered everything."""

    first: float = 0.0  # the command that started the local server
    warm: list[float] = field(default_factory=list)  # with the server up
    no_server: float = 0.0  # --no-server: Prefect's ephemeral mode
    instances: int = 0
    complete: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.warm)


class Cli:
    """`adit` in a subprocess with an isolated Prefect home and port."""

    def __init__(self, root: Path, nodes: Path) -> None:
        self.root = root
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("ADIT_", "PREFECT_"))}
        self.env.update({"PREFECT_HOME": str(root / "prefect-home"),
                         "PREFECT_SERVER_API_PORT": str(self.port), "DO_NOT_TRACK": "1",
                         "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                         "ADIT_NODES_FILE": str(nodes)})

    def run(self, *args: str, python: tuple[str, ...] = ()) -> tuple[float, str]:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *python, "-m", "deployments.cli", *args],
                              env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"adit {' '.join(args)} exited {proc.returncode}:\n"
                               f"{proc.stdout}{proc.stderr[-3000:]}")
        return elapsed, proc.stdout + proc.stderr


def transfer_once(cli: Cli, folder: Path, expected: int, *extra: str,
                  python: tuple[str, ...] = ()) -> tuple[float, bool, str]:
    """One `adit transfer` into an emptied folder; (seconds, complete, output)."""
    shutil.rmtree(folder, ignore_errors=True)
    seconds, output = cli.run(*extra, "transfer", "--source", "pacs", "--destination",
                              "downloads", "--study", STUDY.study_uid, python=python)
    written = sum(1 for p in folder.rglob("*.dcm"))
    return seconds, "success" in output and written == expected, output


def measure(repeat: int, profile: bool) -> CliResult:
    result = CliResult(instances=STUDY.instance_count)
    with tempfile.TemporaryDirectory(prefix="adit-cli-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        source = OrthancServer(root / "orthanc", ae_title="PACS", dicomweb=False)
        stack.callback(source.stop)
        source.start()
        source.upload(write_study(STUDY, root / "study"))
        folder = root / "downloads"
        nodes = root / "nodes.yaml"
        nodes.write_text(yaml.safe_dump({"ae_title": "ADIT", "receiver_port": free_port(),
                                         "nodes": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
             "port": source.dicom_port, "retrieve": ["c-get"]},
            {"name": "downloads", "path": str(folder)}]}))
        cli = Cli(root, nodes)
        stack.callback(lambda: cli.run("server", "stop"))
        expected = STUDY.instance_count

        result.first, ok, _ = transfer_once(cli, folder, expected)
        result.complete &= ok
        print(f"  first command (starts the local server)  {result.first:6.2f} s", flush=True)
        for _ in range(repeat):
            seconds, ok, _ = transfer_once(cli, folder, expected)
            result.warm.append(seconds)
            result.complete &= ok
        print(f"  with the server up, median of {repeat}        {result.median:6.2f} s  "
              f"(runs: {', '.join(f'{t:.2f}' for t in result.warm)})", flush=True)
        if profile:
            profile_command(cli, folder, expected)
        cli.run("server", "stop")  # --no-server would use a running one
        result.no_server, ok, _ = transfer_once(cli, folder, expected, "--no-server")
        result.complete &= ok
        print(f"  --no-server (ephemeral, no server up)    {result.no_server:6.2f} s",
              flush=True)
    return result


def profile_command(cli: Cli, folder: Path, expected: int) -> None:
    """cProfile of one command (top by cumulative time) and its slowest imports."""
    stats = cli.root / "cli.prof"
    transfer_once(cli, folder, expected, python=("-m", "cProfile", "-o", str(stats)))
    import pstats

    print("\n  cProfile of one command with the server up (top 25 by cumulative time):")
    pstats.Stats(str(stats)).sort_stats("cumulative").print_stats(25)
    _, _, output = transfer_once(cli, folder, expected, python=("-X", "importtime"))
    rows = []
    for line in output.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|", 2)
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), name.rstrip()))
    print("  slowest imports (cumulative ms):")
    for micros, name in sorted(rows, reverse=True)[:15]:
        print(f"    {micros / 1000:8.0f}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="commands with the server up")
    parser.add_argument("--profile", action="store_true", help="cProfile and import times")
    parser.add_argument("--json", type=Path, help="write the result as JSON to this file")
    args = parser.parse_args(argv)
    print(f"adit transfer of one study ({STUDY.instance_count} instances of 64x64) to a folder")
    result = measure(args.repeat, args.profile)
    verdict = "ok" if result.median <= TARGET_SECONDS else "MISS"
    print(f"\nCLI latency with the server up: {result.median:.2f} s (target <= "
          f"{TARGET_SECONDS:.0f} s: {verdict}); complete: {result.complete}")
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "median": result.median}))
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
