"""`make bench`: every benchmark in one run, and one table of ADIT against its references.

Runs, one after the other and each in a process of its own (its full output goes to a log file
in a fresh directory under /tmp, named at the start):

* `transfer.py` (150-instance CT study: PACS -> folder, pseudonymized, PACS -> PACS, archive),
* `retrieve.py` (retrieval only from Orthanc: C-GET, C-MOVE, WADO-RS, getscu, movescu),
* `memory.py` (peak RSS of a 1 GB study, 2,000 instances, by C-GET, C-MOVE and WADO-RS),
* `cli.py` (`adit transfer` of a small study with the local server up),
* `batch.py` (200-study batch under Prefect vs the same DICOM work without it; on SQLite, and on
  PostgreSQL when PostgreSQL is installed),

then prints one table: ADIT's figure, the reference measured in the same run (DCMTK, Orthanc),
the ratio reference/ADIT, the target, `ok` or `MISS`, and the checks (every instance arrived,
in the transfer syntax the PACS stores). Exit status 1 when a check failed or a benchmark
broke (a missed target alone is not an error: it is in the table).

Run: ``.venv/bin/python benchmarks/run_all.py [--quick]`` (``--quick``: small sizes, for
trying the script; its figures mean little)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Line:
    """One row of the table."""

    scenario: str
    adit: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""  # "ok", "MISS" or "" (no target)
    checks: str = ""


def run(name: str, args: list[str], logs: Path, env: dict[str, str]) -> dict[str, Any] | None:
    """One benchmark script with `--json`; its result, or None when it broke (see its log)."""
    out = logs / f"{name}.json"
    log = logs / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as stream:
        proc = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:], "--json",
                               str(out)], stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT,
                              env=env, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - start
    ok = out.exists()
    print(f"  {name:<16} {took:6.0f} s  "
          f"{'' if proc.returncode == 0 else f'exit {proc.returncode}, '}log {log}", flush=True)
    return json.loads(out.read_text()) if ok else None


def ratio_line(scenario: str, adit: dict[str, Any] | None, ref_name: str,
               ref: dict[str, Any] | None, target: float, expected: int) -> Line:
    """A timed scenario against its reference: ratio = reference time / ADIT time."""
    if adit is None or ref is None:
        return Line(scenario, "not measured (benchmark failed, see its log)")
    value = ref["median"] / adit["median"]
    return Line(scenario, f"{adit['median']:.2f} s", f"{ref_name} {ref['median']:.2f} s",
                f"{value:.2f}", f">= {target:g}", "ok" if value >= target else "MISS",
                checks(adit, expected))


def checks(result: dict[str, Any], expected: int) -> str:
    arrived = (f"{result['fewest']}/{expected}" if "fewest" in result
               else f"{result['files']}/{expected}")
    text = arrived if result.get("complete") else f"INCOMPLETE {arrived}"
    syntax = result.get("same_syntax")
    if syntax is not None:
        text += ", same syntax" if syntax else ", SYNTAX CHANGED"
    return text


def table(lines: list[Line]) -> str:
    header = Line("scenario", "ADIT", "reference (same run)", "ratio", "target", "", "checks")
    rows = [header, *lines]
    widths = [max(len(getattr(r, f)) for r in rows) for f in Line.__dataclass_fields__]
    out = []
    for i, r in enumerate(rows):
        cells = [getattr(r, f) for f in Line.__dataclass_fields__]
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = parser.parse_args(argv)
    sizes = ({"instances": 20, "big": 100, "repeat": 1, "studies": 12, "cli": 2}
             if args.quick else
             {"instances": 150, "big": 2000, "repeat": 3, "studies": 200, "cli": 5})
    logs = Path(tempfile.mkdtemp(prefix="adit-bench-"))
    # The benchmarks start their own servers: none of the caller's Prefect or ADIT settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ADIT_"))}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    n, repeat = str(sizes["instances"]), str(sizes["repeat"])
    print(f"Benchmarks ({os.cpu_count()} CPUs; logs and JSON results in {logs}):", flush=True)
    started = time.perf_counter()
    transfer = run("transfer", ["transfer.py", "--instances", n, "--repeat", repeat,
                                "--no-profile", "--no-lzma"], logs, env)
    retrieve = run("retrieve", ["retrieve.py", "--instances", n, "--repeat", repeat,
                                "--orthanc-only"], logs, env)
    memory = run("memory", ["memory.py", "--instances", str(sizes["big"])], logs, env)
    cli = run("cli", ["cli.py", "--repeat", str(sizes["cli"])], logs, env)
    batch_args = ["batch.py", "--studies", str(sizes["studies"]),
                  "--transfer", str(sizes["studies"])]
    sqlite = run("batch-sqlite", batch_args, logs, env)
    postgres = (run("batch-postgresql", [*batch_args, "--postgres"], logs, env)
                if _postgres_installed() else None)

    lines = []
    expected = int(n)
    sc = transfer["scenarios"] if transfer else {}
    getscu, peer = sc.get("DCMTK getscu"), sc.get("Orthanc peer store (REST)")
    for label, name, ref_name, ref, target in [
        ("PACS -> folder (C-GET)", "ADIT PACS->folder", "getscu", getscu, 0.5),
        ("PACS -> folder, pseudonymized", "ADIT PACS->folder pseudo", "getscu", getscu, 1 / 3),
        ("PACS -> PACS", "ADIT PACS->PACS", "Orthanc peer store", peer, 0.8),
        ("PACS -> archive, pseudonymized", "ADIT PACS->archive pseudo", "getscu", getscu,
         1 / 3),
    ]:
        lines.append(ratio_line(label, sc.get(name), ref_name, ref, round(target, 2),
                                expected))
    rt = {r["method"]: r for r in retrieve["results"]} if retrieve else {}
    lines.append(ratio_line("retrieval only, C-GET", rt.get("ADIT C-GET"), "getscu",
                            rt.get("DCMTK getscu"), 0.7, expected))
    lines.append(ratio_line("retrieval only, WADO-RS", rt.get("ADIT WADO-RS"), "getscu",
                            rt.get("DCMTK getscu"), 1.0, expected))
    for method in ("c-get", "c-move", "wado-rs"):
        label = f"peak RSS, {sizes['big']}-instance study, {method.upper()}"
        m = memory.get(method) if memory else None
        if m is None:
            lines.append(Line(label, "not measured (benchmark failed, see its log)"))
            continue
        lines.append(Line(label, f"{m['peak_mb']:.0f} MB",
                          f"study {m['megabytes']:.0f} MB, {m['seconds']:.1f} s", "",
                          "< 300 MB", "ok" if m["peak_mb"] < 300 else "MISS",
                          checks(m, int(m["expected"]))))
    if cli:
        done = "complete" if cli["complete"] else "INCOMPLETE"
        lines.append(Line("CLI: adit transfer, 20 instances, server up",
                          f"{cli['median']:.2f} s", f"median of {len(cli['warm'])}", "",
                          "<= 2 s", "ok" if cli["median"] <= 2 else "MISS", done))
        lines.append(Line("CLI: first command (starts the server)", f"{cli['first']:.2f} s",
                          checks=done))
        lines.append(Line("CLI: --no-server (temporary server)", f"{cli['no_server']:.2f} s",
                          checks=done))
    else:
        lines.append(Line("CLI: adit transfer, server up",
                          "not measured (benchmark failed, see its log)"))
    for database, result in (("SQLite", sqlite), ("PostgreSQL", postgres)):
        label = f"batch overhead, {sizes['studies']} studies, {database}"
        if result is None:
            why = ("not measured (PostgreSQL not installed: make cluster-packages)"
                   if database == "PostgreSQL" and not _postgres_installed()
                   else "not measured (benchmark failed, see its log)")
            lines.append(Line(label, why))
            continue
        share = result["transfer"]["overhead"]
        lines.append(Line(label, f"{100 * share:.0f} %",
                          f"flow {result['transfer']['flow']:.1f} s", "", "< 10 %",
                          "ok" if share < 0.10 else "MISS",
                          "complete" if result["complete"] else "INCOMPLETE"))

    print(f"\nADIT vs references, {os.cpu_count()} CPUs, {time.perf_counter() - started:.0f} s"
          f" in all; ratio = reference time / ADIT time (1.0 = as fast); medians of "
          f"{repeat} runs after a warm-up\n")
    print(table(lines))
    broken = [line.scenario for line in lines
              if "INCOMPLETE" in line.checks or "SYNTAX CHANGED" in line.checks
              or line.adit.startswith("not measured (benchmark failed")]
    missed = [line.scenario for line in lines if line.verdict == "MISS"]
    print(f"\n{len(missed)} target(s) missed" + (f": {', '.join(missed)}" if missed else ""))
    if broken:
        print(f"FAILED CHECKS: {', '.join(broken)}")
    return 1 if broken else 0


def _postgres_installed() -> bool:
    sys.path.insert(0, str(ROOT))
    from tests.cluster_lab import postgres_bin

    return postgres_bin() is not None


if __name__ == "__main__":
    sys.exit(main())
