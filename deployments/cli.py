"""The `adit` command line: thin over the flows and the DICOM core.

Exit codes: 0 success, 1 some work failed (the output says which), 2 invalid input or
configuration (nothing was done).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from adit_tasks.core.errors import AditError, InvalidInput, PermanentError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ADIT: automated DICOM transfer between PACS, folders and archives.")

NodesFile = Annotated[Path | None, typer.Option("--nodes-file", envvar="ADIT_NODES_FILE",
                                                 help="YAML nodes file (default ./nodes.yaml)")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _invalid_input() -> Iterator[None]:
    """Bad configuration or input found before any work: its message, exit code 2."""
    try:
        yield
    except AditError as exc:
        raise _fail(str(exc), 2) from None


def _settings(nodes_file: Path | None) -> Any:
    from adit_tasks.core.config import load_settings

    with _invalid_input():
        return load_settings(nodes_file)


def _connection(settings: Any, name: str) -> Any:
    """A connection whose associations are limited on the Prefect server when one runs."""
    from adit_tasks.core.association import Connection, local_slot
    from flows.runtime import use_running_server

    with _invalid_input():
        node = settings.server(name)
    slot = local_slot
    if use_running_server():
        from adit_tasks.tasks import ensure_node_limits, prefect_slot

        ensure_node_limits(settings)
        slot = prefect_slot
    return Connection(node=node, calling_ae=settings.ae_title, slot=slot)


@app.command()
def nodes(nodes_file: NodesFile = None) -> None:
    """List the configured nodes."""
    settings = _settings(nodes_file)
    from adit_tasks.core.config import FolderNode

    if not settings.nodes:
        raise _fail(f"no nodes configured in {settings.nodes_file}", 2)
    for node in settings.nodes:
        if isinstance(node, FolderNode):
            typer.echo(f"{node.name:<16} folder   {node.path}")
            continue
        where = f"{node.ae_title}@{node.host}:{node.port}" if node.has_dimse else ""
        web = f" {node.dicomweb_url}" if node.dicomweb_url else ""
        typer.echo(f"{node.name:<16} server   {where}{web}  retrieve={','.join(node.retrieve)}"
                   f"  max_associations={node.max_associations}")


@app.command()
def echo(node: str, nodes_file: NodesFile = None) -> None:
    """C-ECHO a server; exit 0 when it answers."""
    from adit_tasks.core.find import echo as c_echo

    settings = _settings(nodes_file)
    conn = _connection(settings, node)
    try:
        c_echo(conn)
    except AditError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"{node}: C-ECHO ok")


@app.command()
def query(
    node: str,
    patient_id: Annotated[str, typer.Option(help="PatientID (wildcards * ?)")] = "",
    patient_name: Annotated[str, typer.Option(help="'Last^First' (wildcards * ?)")] = "",
    birth_date: Annotated[str, typer.Option(help="YYYYMMDD or YYYY-MM-DD")] = "",
    study_date: Annotated[str, typer.Option(help="DATE or FROM-UNTIL (open ends allowed)")] = "",
    modality: Annotated[str, typer.Option(help="e.g. CT, or CT,MR")] = "",
    accession: Annotated[str, typer.Option(help="AccessionNumber")] = "",
    study_uid: Annotated[str, typer.Option(help="StudyInstanceUID")] = "",
    level: Annotated[str, typer.Option(help="study or series")] = "study",
    limit: Annotated[int, typer.Option(help="stop after this many results")] = 0,
    out: Annotated[Path | None, typer.Option(help="write a CSV file instead of printing")] = None,
    nodes_file: NodesFile = None,
) -> None:
    """C-FIND studies (or series) on a server: one row per result."""
    from flows.query import build_query, run_query

    settings = _settings(nodes_file)
    if level not in ("study", "series"):
        raise _fail("--level must be study or series", 2)
    with _invalid_input():
        q = build_query(patient_id, patient_name, birth_date, study_date, modality, accession,
                        study_uid, level, limit)
    conn = _connection(settings, node)
    try:
        rows = run_query(conn, q)
    except AditError as exc:
        raise _fail(str(exc), 2 if isinstance(exc, InvalidInput) else 1) from None
    _write_rows(rows, out)
    if out:
        typer.echo(f"{len(rows)} result(s) written to {out}", err=True)


def _write_rows(rows: list[dict[str, Any]], out: Path | None) -> None:
    if not rows and out is None:
        typer.echo("no results", err=True)
        return
    fieldnames = list(rows[0]) if rows else []
    stream = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115
    try:
        writer = csv.DictWriter(stream, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if out:
            stream.close()


def _check_secrets(options: Any) -> None:
    """On a terminal, ask for an archive password that is not in the environment. It goes
    into this process's environment only: the flow reads it there, and it never becomes a flow
    parameter (which Prefect stores and shows). Missing secrets otherwise fail in the flow,
    before any work, with exit code 2 (a Prefect Secret block may provide them)."""
    import os

    from adit_tasks.core.config import SecretSettings

    if options.archive and SecretSettings().archive_password is None and sys.stdin.isatty():
        os.environ["ADIT_ARCHIVE_PASSWORD"] = typer.prompt(
            "Archive password", hide_input=True, confirmation_prompt=True)


@app.command()
def transfer(
    source: Annotated[str, typer.Option(help="source server node")],
    destination: Annotated[str, typer.Option(help="destination server or folder node")],
    study: Annotated[list[str], typer.Option(help="StudyInstanceUID (repeatable)")],
    series: Annotated[list[str] | None, typer.Option(help="SeriesInstanceUID (repeatable)")] = None,
    pseudonymize: Annotated[bool, typer.Option(help="pseudonymize (PS3.15 basic profile)")] = False,
    pseudonym: Annotated[str, typer.Option(help="pseudonym for PatientID/Name (implies "
                                                "--pseudonymize)")] = "",
    trial_id: Annotated[str, typer.Option(help="ClinicalTrialProtocolID")] = "",
    trial_name: Annotated[str, typer.Option(help="ClinicalTrialProtocolName")] = "",
    dates: Annotated[str, typer.Option(help="shift, keep or remove dates when pseudonymizing")]
    = "shift",
    keep_patient_characteristics: Annotated[bool, typer.Option(
        help="retain sex, age, size, weight")] = False,
    keep_device_identity: Annotated[bool, typer.Option(help="retain device identity")] = False,
    no_clean_descriptors: Annotated[bool, typer.Option(
        help="remove descriptions instead of cleaning them")] = False,
    allow_burned_in: Annotated[bool, typer.Option(
        help="send images flagged with burned-in annotation")] = False,
    archive: Annotated[bool, typer.Option(help="one encrypted 7-Zip archive in the destination "
                                               "folder (password: ADIT_ARCHIVE_PASSWORD)")] = False,
    compress: Annotated[bool, typer.Option(help="LZMA2 inside the archive (slower)")] = False,
    method: Annotated[str | None, typer.Option(help="c-get, c-move or wado-rs")] = None,
    nodes_file: NodesFile = None,
) -> None:
    """Transfer studies from a server to a server, a folder or an archive (a Prefect flow run)."""

    settings = _settings(nodes_file)
    with _invalid_input():
        settings.server(source)
        settings.node(destination)
    if method not in (None, "c-get", "c-move", "wado-rs"):
        raise _fail("--method must be c-get, c-move or wado-rs", 2)
    if dates not in ("shift", "keep", "remove"):
        raise _fail("--dates must be shift, keep or remove", 2)
    from adit_tasks.core.find import validate_uid

    with _invalid_input():
        for uid in [*study, *(series or [])]:
            validate_uid(uid)
    from flows.options import TransferOptions
    from flows.runtime import use_running_server

    options = TransferOptions(
        pseudonymize=pseudonymize, pseudonym=pseudonym, trial_id=trial_id,
        trial_name=trial_name, dates=dates,
        retain_patient_characteristics=keep_patient_characteristics,
        retain_device_identity=keep_device_identity,
        clean_descriptors=not no_clean_descriptors, allow_burned_in=allow_burned_in,
        archive=archive, compress=compress)
    _check_secrets(options)
    use_running_server()
    from flows.transfer import transfer_flow

    state = transfer_flow(source, destination, study, series or None, options, method,
                          nodes_file=str(settings.nodes_file), return_state=True)
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, BaseException):
        code = 2 if isinstance(rows, PermanentError | ValueError) else 1
        raise _fail(str(rows), code)
    for row in rows:
        counts = (f"{row.get('transferred', 0)}/{row.get('expected')} instances"
                  if "expected" in row else "")
        typer.echo(f"study {row['study']}: {row['status']}  {counts}  {row['message']}")
    if any(r["status"] == "failure" for r in rows):
        raise typer.Exit(1)


def _run_with_progress(label: str, run: Any) -> Any:
    """Run a flow, with a progress bar on a terminal (fed by the flows' progress listener)."""
    from flows import transfer as transfer_module

    if not sys.stderr.isatty():
        return run()
    with typer.progressbar(length=1, label=label, file=sys.stderr) as bar:
        def update(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        transfer_module.progress_listener = update
        try:
            return run()
        finally:
            transfer_module.progress_listener = None


def _batch_result(state: Any) -> list[dict[str, Any]]:
    rows = state.result(raise_on_failure=False)
    if isinstance(rows, BaseException):
        code = 2 if isinstance(rows, PermanentError | ValueError) else 1
        raise _fail(str(rows), code)
    return rows


@app.command("batch-query")
def batch_query(
    file: Annotated[Path, typer.Argument(help="batch file (.csv or .xlsx)")],
    source: Annotated[str, typer.Option(help="server to query")],
    out: Annotated[Path, typer.Option(help="result file (.csv or .xlsx)")],
    level: Annotated[str, typer.Option(help="study or series")] = "study",
    nodes_file: NodesFile = None,
) -> None:
    """Look up every row of a batch file: find Patient IDs, studies, check presence."""
    from adit_tasks.core.batch_file import read_batch_file

    settings = _settings(nodes_file)
    with _invalid_input():
        settings.server(source)
        if level not in ("study", "series"):
            raise InvalidInput("--level must be study or series")
        if out.suffix.lower() not in (".csv", ".xlsx"):
            raise InvalidInput(f"{out}: results can be written as .csv or .xlsx only")
        read_batch_file(file, "query")  # all problems at once, before anything runs
    from flows.runtime import use_running_server

    use_running_server()
    from flows.batch import batch_query_flow

    state = _run_with_progress("querying", lambda: batch_query_flow(
        str(file.resolve()), source, str(out.resolve()), level=level,
        nodes_file=str(settings.nodes_file), return_state=True))
    rows = _batch_result(state)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["Status"]] = counts.get(row["Status"], 0) + 1
    typer.echo(f"{len(rows)} result rows written to {out}: "
               + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if counts.get("failure"):
        raise typer.Exit(1)


@app.command("batch-transfer")
def batch_transfer(
    file: Annotated[Path, typer.Argument(help="batch file (.csv or .xlsx)")],
    source: Annotated[str, typer.Option(help="source server node")],
    destination: Annotated[str, typer.Option(help="destination server or folder node")],
    pseudonymize: Annotated[bool, typer.Option(help="pseudonymize (PS3.15 basic profile)")] = False,
    trial_id: Annotated[str, typer.Option(help="ClinicalTrialProtocolID")] = "",
    trial_name: Annotated[str, typer.Option(help="ClinicalTrialProtocolName")] = "",
    archive: Annotated[bool, typer.Option(help="one encrypted 7-Zip archive in the destination "
                                               "folder (password: ADIT_ARCHIVE_PASSWORD)")] = False,
    out: Annotated[Path | None, typer.Option(help="result file (.csv or .xlsx)")] = None,
    nodes_file: NodesFile = None,
) -> None:
    """Transfer the studies listed in a batch file; one result row per input row."""
    from adit_tasks.core.batch_file import read_batch_file
    from flows.options import TransferOptions

    settings = _settings(nodes_file)
    with _invalid_input():
        settings.server(source)
        settings.node(destination)
        if out is not None and out.suffix.lower() not in (".csv", ".xlsx"):
            raise InvalidInput(f"{out}: results can be written as .csv or .xlsx only")
        read_batch_file(file, "transfer")
    options = TransferOptions(pseudonymize=pseudonymize, trial_id=trial_id,
                              trial_name=trial_name, archive=archive)
    _check_secrets(options)
    from flows.runtime import use_running_server

    use_running_server()
    from flows.batch import batch_transfer_flow

    state = _run_with_progress("transferring", lambda: batch_transfer_flow(
        str(file.resolve()), source, destination, options,
        out=str(out.resolve()) if out else "", nodes_file=str(settings.nodes_file),
        return_state=True))
    rows = _batch_result(state)
    for row in rows:
        typer.echo(f"row {row['Row']}: {row['Status']}  {row.get('Instances', 0)} instances"
                   f"  {row.get('Message', '')}")
    if out:
        typer.echo(f"results written to {out}")
    if any(r["Status"] == "failure" for r in rows):
        raise typer.Exit(1)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Prefect server port on 127.0.0.1")] = 4200,
    nodes_file: NodesFile = None,
) -> None:
    """Start (or reuse) a local Prefect server and serve every ADIT flow; prints the UI address."""
    from adit_tasks.core.config import nodes_file_path
    from deployments.serve import serve as run_serve

    settings = _settings(nodes_file)
    if not settings.nodes:
        raise _fail(f"no nodes configured in {nodes_file_path(nodes_file)}", 2)
    raise typer.Exit(run_serve(settings.nodes_file, port))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from flows.runtime import prepare_environment

    prepare_environment()
    app()


if __name__ == "__main__":
    main()
