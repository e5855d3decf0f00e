"""`adit serve`: the embedded default for the web interface, in one command.

Starts (or reuses) a local Prefect server with SQLite on 127.0.0.1 (the CLI's local server of
flows/runtime.py when it runs on the port: same Prefect home, same database), creates the
per-node global concurrency limits, and serves every flow of the product as a deployment from
this one process (no work pool needed). Flow runs started from the UI run here, with the nodes
file this command was given. Stopping it (Ctrl-C) pauses the deployments and stops the Prefect
server if this command started it (a server it reused keeps running).

The server's API URL is a Prefect setting for the serving block (flows/runtime.py
`prefect_settings`), not an environment variable: the flow-run processes `prefect.serve`
starts get it from Prefect, which passes its current settings on to them.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from flows.runtime import (
    DEFAULT_PORT,
    LOG_FILE,
    ServerError,
    local_api_url,
    local_server,
    prefect_home,
    prefect_settings,
    server_healthy,
    start_prefect_server,
    stop_process_group,
    wait_healthy,
)


def deployments(nodes_file: str, settings: Any = None) -> list:
    """Every flow of the product as a deployment, defaults pointing at this nodes file, and
    one scheduled deployment per continuous job of the nodes file."""
    from adit_tasks.core.options import TransferOptions
    from flows.batch import batch_query_flow, batch_transfer_flow
    from flows.continuous import continuous_transfer_flow
    from flows.query import query_flow
    from flows.selective_transfer import selective_transfer_flow
    from flows.transfer import transfer_flow

    common = {"nodes_file": nodes_file}
    served = [
        (selective_transfer_flow, "pick-studies",
         "Search a PACS, tick studies in the run's Resume form, transfer them."),
        (transfer_flow, "transfer", "Transfer studies by StudyInstanceUID."),
        (query_flow, "query", "Search a PACS; the result is a table artifact."),
        (batch_query_flow, "batch-query",
         "Look up every row of a CSV/Excel batch (path or pasted CSV)."),
        (batch_transfer_flow, "batch-transfer",
         "Transfer the studies of a CSV/Excel batch (path or pasted CSV)."),
        (continuous_transfer_flow, "continuous",
         "Keep a destination in sync for a cohort (run it on a schedule)."),
    ]
    return [
        flow.to_deployment(name=name, parameters=common, tags=["adit"], description=text)
        for flow, name, text in served
    ] + [
        continuous_transfer_flow.to_deployment(
            name=f"continuous-{job.job}", cron=job.cron, tags=["adit", "continuous"],
            concurrency_limit=1,  # one run of a job at a time; the next waits its turn
            parameters={**common, **job.model_dump(exclude={"cron", "options"}),
                        "options": TransferOptions(**job.options).model_dump()},
            description=f"Continuous job {job.job}: {job.source} -> {job.destination}.")
        for job in (settings.continuous if settings is not None else [])
    ]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(settings: Any, port: int = DEFAULT_PORT) -> int:
    """Run until interrupted (Ctrl-C or SIGTERM); returns the exit code. `settings`: the
    loaded settings (their nodes file is the one the deployments use)."""
    # A process started in the background by a non-interactive shell ignores SIGINT: restore
    # it, and treat SIGTERM the same, so the Prefect server we start is always stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    recorded = local_server()  # the CLI's local server, when it runs on this port
    api_url = recorded.api_url if recorded and recorded.port == port else local_api_url(port)
    started = None
    if not server_healthy(api_url):
        log = prefect_home() / LOG_FILE
        started = start_prefect_server(port, log, prefect_home())
        try:
            wait_healthy(started, api_url, log)
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        with prefect_settings(api_url, adit_logs=True):
            from prefect import serve as prefect_serve

            from adit_tasks.limits import ensure_node_limits

            ensure_node_limits(settings.servers)
            print(f"ADIT is served. Open the Prefect UI: http://127.0.0.1:{port}  "
                  "(Deployments -> pick-studies -> Run). Ctrl-C stops it.", flush=True)
            prefect_serve(*deployments(str(Path(settings.nodes_file).resolve()), settings),
                          print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        if started is not None:
            stop_process_group(started)
    return 0
