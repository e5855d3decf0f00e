"""`python -m deployments.cluster setup | worker`: a shared Prefect server and its workers.

`setup`: run once per server (and again after an upgrade; every step is idempotent), on any machine
with the product installed and `PREFECT_API_URL` naming the server:

* the `process` work pool `adit` (prefect.yaml's deployments use it), created if missing;
* the automations that mark runs of dead machines Crashed and run them again
  (adit_tasks/cluster.py), created or corrected;
* the per-node concurrency and rate limits of the nodes file (`--nodes-file`, default
  `ADIT_NODES_FILE`), created or resized, so no run has to create them.

Then `prefect --no-prompt deploy --all` and start the workers (README, "Prefect server, workers
and scale-out"; the production files are in deployments/systemd/).

`worker --limit N [--name NAME]`: checks what a worker needs (`PREFECT_API_URL` ending in
`/api` and answering, an absolute `ADIT_NODES_FILE` that loads) and becomes
`prefect worker start --pool adit --limit N`, with SIGINT reset to its default first: a
worker started in the background of a non-interactive shell inherits SIGINT ignored, and as
Prefect's worker turns SIGTERM into SIGINT, it would ignore the first SIGTERM (a stop).
`--limit` matters: without it one worker takes every scheduled run.

Exit codes: 0 done, 2 bad configuration or no server (nothing was changed).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

POOL = "adit"


def _fail(message: str) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def check_api_url(url: str | None) -> str:
    """The server's API URL, or SystemExit(2) with one line saying what is wrong."""
    if not url:
        raise _fail("set PREFECT_API_URL to the server's API, e.g. "
                    "http://prefect.internal:4200/api")
    if not url.rstrip("/").endswith("/api"):
        raise _fail(f"PREFECT_API_URL={url} must end in /api (else every call is a 404)")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # with PREFECT_API_AUTH_STRING if set
        problem = client.api_healthcheck()
        version = "" if problem else client.api_version()
    if problem or not version.startswith("3."):
        raise _fail(f"no Prefect 3 server answers at {url}"
                    + (f" ({problem})" if problem else f" (version {version})"))
    return url


def ensure_work_pool(name: str = POOL) -> str:
    """The process work pool, created when missing (an existing one is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return f"work pool '{name}' is in place"
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            return f"work pool '{name}' is in place"
    return f"created work pool '{name}' (type process)"


def setup(nodes_file: Path | None, pool: str = POOL) -> list[str]:
    """Every step of the set-up; one line per step."""
    from adit_tasks.cluster import ensure_automations
    from adit_tasks.core.config import load_settings
    from adit_tasks.limits import ensure_node_limits

    settings = load_settings(nodes_file) if nodes_file else None  # before any change
    lines = [ensure_work_pool(pool), *ensure_automations()]
    if settings is not None:
        ensure_node_limits(settings.servers)
        lines += [f"limit {n.limit_name}: {n.max_associations} associations"
                  + (f", {n.studies_per_minute:g} studies per minute"
                     if n.studies_per_minute else "") for n in settings.servers]
    return lines


def check_worker_environment() -> None:
    """What every worker needs, or SystemExit(2) naming what is wrong."""
    from adit_tasks.core.config import load_settings
    from adit_tasks.core.errors import ConfigError

    check_api_url(os.environ.get("PREFECT_API_URL"))
    nodes_file = os.environ.get("ADIT_NODES_FILE")
    if not nodes_file or not Path(nodes_file).is_absolute():
        raise _fail("set ADIT_NODES_FILE to the absolute path of the nodes file (flow runs "
                    "start in the worker's folder, and a relative path is read from there)")
    try:
        load_settings(nodes_file)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def exec_worker(pool: str, limit: int, name: str | None) -> None:
    """Become `prefect worker start`, SIGINT at its default (see the module doc)."""
    import shutil
    import signal

    prefect = (shutil.which("prefect", path=str(Path(sys.executable).parent))
               or shutil.which("prefect"))
    if prefect is None:
        raise _fail("the `prefect` command is not installed next to this Python")
    args = [prefect, "worker", "start", "--pool", pool, "--limit", str(limit)]
    if name:
        args += ["--name", name]
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    os.execv(prefect, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.cluster",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("setup", help="work pool, automations and limits")
    command.add_argument("--nodes-file", type=Path,
                         default=os.environ.get("ADIT_NODES_FILE") or None,
                         help="nodes file whose limits to create (default ADIT_NODES_FILE)")
    command.add_argument("--pool", default=POOL, help="work pool name (prefect.yaml: adit)")
    worker = commands.add_parser("worker", help="check the environment, start a worker")
    worker.add_argument("--limit", type=int, required=True,
                        help="flow runs at once on this machine (else one worker takes all)")
    worker.add_argument("--name", help="worker name shown in the UI (default: Prefect's)")
    worker.add_argument("--pool", default=POOL, help="work pool name (prefect.yaml: adit)")
    args = parser.parse_args(argv)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if args.command == "worker":
        if args.limit < 1:
            raise _fail("--limit must be at least 1")
        check_worker_environment()
        exec_worker(args.pool, args.limit, args.name)
    check_api_url(os.environ.get("PREFECT_API_URL"))
    from adit_tasks.core.errors import ConfigError

    try:
        lines = setup(args.nodes_file, args.pool)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    for line in lines:
        print(line)
    print("next: prefect --no-prompt deploy --all, then on each machine "
          "python -m deployments.cluster worker --limit N")
    sys.exit(0)


if __name__ == "__main__":
    main()
