"""The `adit` command line: thin over the flows and the DICOM core.

Exit codes: 0 success, 1 some work failed (the output says which, one line per failure),
2 invalid input or configuration (nothing was done).

The search fields of `query` and the transfer options of `transfer` and `batch-transfer` are
made from `StudySearch` and `TransferOptions` (deployments/model_options.py): one declaration
for the CLI, the flows and the UI forms.

What the terminal shows: the results, one line each, and warnings. The Prefect run logs of the
flows this command runs (`prefect.flow_runs`, `prefect.task_runs`: "Created flow run ...",
"Task run failed" with its traceback, ...) go to the run's log on the Prefect server only
(`prefect flow-run logs ID`), not to the terminal.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from adit_tasks.core.errors import AditError, PermanentError
from adit_tasks.core.options import StudySearch, TransferOptions
from deployments.model_options import model_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ADIT: automated DICOM transfer between PACS, folders and archives.")

NodesFile = Annotated[Path | None, typer.Option("--nodes-file", envvar="ADIT_NODES_FILE",
                                                 help="YAML nodes file (default ./nodes.yaml)")]
Level = Annotated[Literal["study", "series"], typer.Option(help="study or series")]
Method = Annotated[Literal["c-get", "c-move", "wado-rs"] | None, typer.Option(
    help="retrieve with c-get, c-move or wado-rs (default: the source node's preference)")]
Notify = Annotated[list[str] | None, typer.Option(
    help="e-mail address or http(s) webhook URL told when the job ends (repeatable)")]

# Loggers whose records are the flow runs' own log: kept off the terminal (see above).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# DICOM libraries whose failures come back to the user as ADIT errors with a message: their
# own log lines (e.g. pynetdicom's "Association request failed") would only repeat them.
LIBRARY_LOGGERS = ("pynetdicom", "pydicom")
PROGRESS_LOGGER = "adit.progress"
ADIT_LOGGER = "adit_tasks"


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


@contextlib.contextmanager
def _connection(settings: Any, name: str) -> Iterator[Any]:
    """A connection to a server whose associations hold a slot of the node's limit on the
    Prefect server when one runs (shared with every flow run), else a process-local one."""
    from adit_tasks.core.association import Connection, local_slot
    from flows.runtime import running_server

    with _invalid_input():
        node = settings.server(name)
    api_url = running_server()
    if api_url is None:
        yield Connection(node, settings.ae_title, local_slot)
        return
    from adit_tasks.limits import association_slot, ensure_node_limits
    from flows.runtime import prefect_settings

    with prefect_settings(api_url):
        try:
            ensure_node_limits([node])
        except Exception as exc:
            raise _fail(f"the Prefect server at {api_url} did not answer "
                        f"({type(exc).__name__})", 1) from None
        yield Connection(node, settings.ae_title, association_slot)


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
    with _connection(settings, node) as conn:
        try:
            c_echo(conn)
        except AditError as exc:
            raise _fail(str(exc), 1) from None
    typer.echo(f"{node}: C-ECHO ok")


@app.command()
@model_options("search", StudySearch)
def query(
    node: Annotated[str, typer.Argument(help="server to query")],
    search: StudySearch,
    level: Level = "study",
    limit: Annotated[int, typer.Option(min=0, help="stop after this many results")] = 0,
    out: Annotated[Path | None, typer.Option(help="write a CSV file instead of printing")] = None,
    nodes_file: NodesFile = None,
) -> None:
    """C-FIND studies (or series) on a server: one row per result (no flow run)."""
    from adit_tasks.core import find

    settings = _settings(nodes_file)
    with _invalid_input():
        q = search.query(level, limit)  # type: ignore[arg-type]
    with _connection(settings, node) as conn:
        try:
            rows = [find.as_row(r) for r in find.find_at_level(conn, q)]
        except AditError as exc:
            raise _fail(str(exc), 2 if isinstance(exc, PermanentError) else 1) from None
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


class _ProgressBar(logging.Handler):
    """Feeds a progress bar from the flows' `adit.progress` records (`record.progress` is
    `(done, total)`)."""

    def __init__(self, bar: Any) -> None:
        super().__init__(logging.DEBUG)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        progress = getattr(record, "progress", None)
        if progress is None:
            return
        done, total = progress
        self.bar.length = max(total, 1)
        self.bar.update(done - self.bar.pos)


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[None]:
    """A progress bar on the terminal while the block runs (nothing when not a terminal)."""
    if not sys.stderr.isatty():
        yield
        return
    logger = logging.getLogger(PROGRESS_LOGGER)
    level = logger.level
    with typer.progressbar(length=1, label=label, file=sys.stderr) as bar:
        handler = _ProgressBar(bar)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _run_flow(label: str, run: Callable[[], Any]) -> tuple[Any, Any]:
    """Run a flow in this process, against the Prefect server Prefect's settings name, else
    the local server (started now if none runs, and kept for later commands; with
    `--no-server` a running one or Prefect's ephemeral mode), with a progress bar on a
    terminal; its final state and result.

    A run that failed before any work (invalid input or configuration, e.g. a missing archive
    password) exits 2 with its message; one that broke otherwise exits 1.
    """
    from flows.runtime import ServerError, prefect_settings, server_for_flows

    try:
        api_url = server_for_flows(start=not _root_option("no_server"))
    except ServerError as exc:
        raise _fail(f"{exc} (or run with `adit --no-server ...`)", 1) from None
    with prefect_settings(api_url, heartbeats=False), _adit_records_to_run_log():
        if api_url:
            _check_server(api_url)
        with _progress_bar(label):
            state = run()
        result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        code = 2 if isinstance(result, PermanentError | ValueError) else 1
        typer.echo(f"error: {result}", err=True)
        if code == 1:
            _log_hint(state)
        raise typer.Exit(code)
    return state, result


def _root_option(name: str) -> Any:
    """A global option of `adit` (given before the command), from the click context."""
    import click

    context = click.get_current_context(silent=True)
    return context.find_root().params.get(name) if context else None


def _check_server(api_url: str) -> None:
    """Exit 1 with one line when the Prefect server does not answer (nothing was done)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise _fail(f"the Prefect server at {api_url} does not answer "
                    f"({type(problem).__name__})", 1)


@contextlib.contextmanager
def _adit_records_to_run_log() -> Iterator[None]:
    """ADIT's own log records (loggers `adit_tasks.*`, e.g. a refused association before a
    retry) logged inside a flow or task run go to that run's log on the Prefect server, with
    Prefect's run logs, instead of the terminal."""
    from prefect.logging.handlers import APILogHandler

    class RunLog(APILogHandler):
        def emit(self, record: logging.LogRecord) -> None:
            if _in_a_run():
                super().emit(record)

    logger = logging.getLogger(ADIT_LOGGER)
    handler = RunLog()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _log_hint(state: Any) -> None:
    """Where the details (tracebacks) of a run are: its log on the Prefect server."""
    run_id = getattr(state.state_details, "flow_run_id", None)
    if run_id:
        typer.echo(f"details: prefect flow-run logs {run_id}", err=True)


@app.command()
@model_options("options", TransferOptions)
def transfer(
    source: Annotated[str, typer.Option(help="source server node")],
    destination: Annotated[str, typer.Option(help="destination server or folder node")],
    study: Annotated[list[str], typer.Option(help="StudyInstanceUID (repeatable)")],
    series: Annotated[list[str] | None, typer.Option(
        help="SeriesInstanceUID (repeatable; only with one --study)")] = None,
    *,
    options: TransferOptions,
    method: Method = None,
    nodes_file: NodesFile = None,
    notify: Notify = None,
) -> None:
    """Transfer studies from a server to a server, a folder or an archive (a Prefect flow run).

    Secrets: ADIT_PSEUDONYM_SECRET, ADIT_ARCHIVE_PASSWORD (environment, .env, Secret blocks).
    """
    from adit_tasks.core.find import validate_uid
    from adit_tasks.core.notice import recipients

    settings = _settings(nodes_file)
    with _invalid_input():
        settings.server(source)
        settings.node(destination)
        for uid in study:
            validate_uid(uid, "StudyInstanceUID")
        for uid in series or []:
            validate_uid(uid, "SeriesInstanceUID")
        recipients(notify or [])
    from flows.transfer import transfer_flow

    state, results = _run_flow("transferring", lambda: transfer_flow(
        source, destination, list(study), list(series) if series else None, options, method,
        nodes_file=str(settings.nodes_file), notify=notify, return_state=True))
    for result in results:
        parts = [f"study {result.number}: {result.status}", result.counts(), result.message]
        typer.echo("  ".join(part for part in parts if part))
    if any(result.failed for result in results):
        _log_hint(state)
        raise typer.Exit(1)


@app.command("batch-query")
def batch_query(
    file: Annotated[Path, typer.Argument(help="batch file (.csv or .xlsx)")],
    source: Annotated[str, typer.Option(help="server to query")],
    out: Annotated[Path, typer.Option(help="result file (.csv or .xlsx)")],
    level: Level = "study",
    nodes_file: NodesFile = None,
    notify: Notify = None,
) -> None:
    """Look up every row of a batch file: find Patient IDs, studies, check presence."""
    from adit_tasks.core.notice import recipients

    settings = _settings(nodes_file)
    with _invalid_input():
        settings.server(source)
        recipients(notify or [])
    from flows.batch import batch_query_flow

    state, rows = _run_flow("querying", lambda: batch_query_flow(
        str(file.resolve()), source, str(out.resolve()), level=level,
        nodes_file=str(settings.nodes_file), notify=notify, return_state=True))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["Status"]] = counts.get(row["Status"], 0) + 1
    typer.echo(f"{len(rows)} result rows written to {out}: "
               + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if counts.get("failure"):
        _log_hint(state)
        raise typer.Exit(1)


@app.command("batch-transfer")
@model_options("options", TransferOptions)
def batch_transfer(
    file: Annotated[Path, typer.Argument(help="batch file (.csv or .xlsx)")],
    source: Annotated[str, typer.Option(help="source server node")],
    destination: Annotated[str, typer.Option(help="destination server or folder node")],
    options: TransferOptions,
    method: Method = None,
    out: Annotated[Path | None, typer.Option(help="result file (.csv or .xlsx)")] = None,
    nodes_file: NodesFile = None,
    notify: Notify = None,
) -> None:
    """Transfer the studies listed in a batch file; one result row per input row."""
    from adit_tasks.core.notice import recipients

    settings = _settings(nodes_file)
    with _invalid_input():
        settings.server(source)
        settings.node(destination)
        recipients(notify or [])
    from flows.batch import batch_transfer_flow

    state, rows = _run_flow("transferring", lambda: batch_transfer_flow(
        str(file.resolve()), source, destination, options,
        out=str(out.resolve()) if out else "", method=method,
        nodes_file=str(settings.nodes_file), notify=notify, return_state=True))
    for row in rows:
        instances = row.get("Instances")
        parts = [f"row {row['Row']}: {row['Status']}",
                 f"{instances} instances" if instances not in (None, "") else "",
                 str(row.get("Message") or "")]
        typer.echo("  ".join(part for part in parts if part))
    if out:
        typer.echo(f"results written to {out}")
    if any(r["Status"] == "failure" for r in rows):
        _log_hint(state)
        raise typer.Exit(1)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Prefect server port on 127.0.0.1")] = 4200,
    nodes_file: NodesFile = None,
) -> None:
    """Start (or reuse) a local Prefect server and serve every ADIT flow; prints the UI address."""
    from deployments.serve import serve as run_serve

    settings = _settings(nodes_file)
    if not settings.nodes:
        raise _fail(f"no nodes configured in {settings.nodes_file}", 2)
    raise typer.Exit(run_serve(settings, port))


@app.callback()
def _global_options(no_server: Annotated[bool, typer.Option(
        "--no-server", help="start no local Prefect server: flows run against PREFECT_API_URL "
        "or a running one, else in a temporary server of the command (~10 s; nothing is "
        "left running)")] = False) -> None:
    """ADIT: automated DICOM transfer between PACS, folders and archives."""


server_app = typer.Typer(no_args_is_help=True, help=(
    "The local Prefect server that commands running flows start when none runs "
    "(its database, log and state file are in PREFECT_HOME, default ~/.prefect)."))
app.add_typer(server_app, name="server")


@server_app.command("status")
def server_status() -> None:
    """Whether the local server runs: its PID and address; exit 1 when none runs."""
    from flows.runtime import STATE_FILE, local_server, prefect_home, running_server

    server = local_server()
    if server is None:
        other = running_server()
        where = f"; flows would use {other}" if other else ""
        typer.echo(f"no local server recorded in {prefect_home() / STATE_FILE}{where}")
        raise typer.Exit(1)
    typer.echo(f"running: pid {server.pid}, UI http://127.0.0.1:{server.port}, API "
               f"{server.api_url}, log {server.log}")


@server_app.command("start")
def server_start(port: Annotated[int | None, typer.Option(
        help="port on 127.0.0.1 (default PREFECT_SERVER_API_PORT or 4200; a free one when "
             "it is taken)")] = None) -> None:
    """Start the local server now (commands that run flows start it when needed)."""
    from flows.runtime import ServerError, start_local_server

    try:
        server = start_local_server(port=port)
    except ServerError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"running: pid {server.pid}, UI http://127.0.0.1:{server.port}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local server (only the process recorded as that server)."""
    from flows.runtime import ServerError, stop_local_server

    try:
        server = stop_local_server()
    except ServerError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"stopped the local server (pid {server.pid})" if server
               else "no local server runs")


class _ForTheTerminal(logging.Filter):
    """Keeps off the terminal: the flow runs' own log records (see the module docstring),
    ADIT's records logged inside a run (they go to the run's log: `_adit_records_to_run_log`)
    and the DICOM libraries' records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(RUN_LOGGERS + LIBRARY_LOGGERS):
            return False
        return not (record.name.startswith(ADIT_LOGGER) and _in_a_run())


def _in_a_run() -> bool:
    """Whether the caller runs inside a Prefect flow or task run (never imports Prefect)."""
    context = sys.modules.get("prefect.context")
    return context is not None and (context.FlowRunContext.get() is not None
                                    or context.TaskRunContext.get() is not None)


def _terminal_logging() -> None:
    """Warnings and errors on stderr, one line each, without the run logs. Installed before
    Prefect is imported: Prefect's logging set-up then keeps this root handler instead of its
    own console handler, and still sends the run logs to the API (its `api` handler on the
    run loggers), at Prefect's logging level (INFO unless PREFECT_LOGGING_LEVEL says)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    handler.addFilter(_ForTheTerminal())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # pydicom also warns (Python warnings) about values it checks, e.g. an invalid UID the
    # user typed: the command reports those itself.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@app.command()
def verify(
    delivery: Annotated[Path, typer.Argument(
        help="a folder destination (its manifests/ folder), or a job's .7z archive")],
    nodes_file: NodesFile = None,
) -> None:
    """Check a delivery against its manifest: every file there and unchanged, nothing else.

    Exit 0: all present and unchanged; 1: files missing, changed or extra (listed); 2: cannot
    verify (no manifest, unreadable, wrong archive password). An archive's password comes
    from ADIT_ARCHIVE_PASSWORD (environment or .env), else it is asked for.
    """
    from adit_tasks.core.manifest import CannotVerify, verify_archive, verify_folder

    try:
        if delivery.is_dir():
            report = verify_folder(delivery)
        else:
            settings = _settings(nodes_file)
            password = (settings.archive_password.get_secret_value()
                        if settings.archive_password else "")
            if not password and delivery.is_file() and sys.stdin.isatty():
                password = typer.prompt("Archive password", hide_input=True)
            report = verify_archive(delivery, password)
    except CannotVerify as exc:
        raise _fail(f"cannot verify: {exc}", 2) from None
    for what in ("missing", "changed", "extra"):
        for path in getattr(report, what):
            typer.echo(f"{what}: {path}")
    listed = f"{report.files} file(s) listed in {report.manifests} manifest(s)"
    if report.ok:
        typer.echo(f"verified: {listed}, all present and unchanged")
        return
    typer.echo(f"not verified: {len(report.missing)} missing, {len(report.changed)} changed, "
               f"{len(report.extra)} extra ({listed})")
    raise typer.Exit(1)


def main() -> None:
    # Process start, before Prefect is imported, and the only environment write of the
    # command: Prefect's client telemetry reads DO_NOT_TRACK from the environment when
    # `prefect` is imported and has no setting for it (no internet here, and none wanted in
    # a hospital). Server analytics are switched off through Prefect settings
    # (flows/runtime.py prefect_settings) and the environment of the server `serve` starts.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    _terminal_logging()
    try:
        app()
    finally:
        # Everything the command made is garbage now: freezing it spares the collector's
        # passes over Prefect's million objects at interpreter exit (~0.5 s per command).
        gc.freeze()


if __name__ == "__main__":
    main()
