"""Process set-up shared by the CLI and `adit serve`: which Prefect server to talk to, Prefect
settings for offline use, and stopping the processes we start.

Nothing here writes the environment. Prefect settings are applied with Prefect's public
`prefect.settings.temporary_settings` around the block that needs them (a flow call of the
CLI, `prefect.serve`), and they reach the processes Prefect starts by itself (its ephemeral
server, the flow-run processes of `serve`), because Prefect passes its current settings on to
them (`Settings.to_environment_variables`).

The one environment variable that no Prefect setting replaces, `DO_NOT_TRACK` (Prefect's
client telemetry reads it from the environment when `prefect` is imported), is set once at
process start by the CLI's `main()`, before Prefect is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_PORT = 4200
LOCAL_API_URL = f"http://127.0.0.1:{DEFAULT_PORT}/api"


def local_api_url(port: int = DEFAULT_PORT) -> str:
    return f"http://127.0.0.1:{port}/api"


def server_healthy(api_url: str, timeout: float = 1.0) -> bool:
    """Whether a Prefect 3 server answers at this API URL: its health check, and a version
    this client speaks (whatever else answers on a local port is not used)."""
    base = api_url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as rsp:
            if rsp.status != 200:
                return False
        with urllib.request.urlopen(f"{base}/admin/version", timeout=timeout) as rsp:
            version = json.loads(rsp.read(100))
    except (OSError, ValueError):
        return False
    return isinstance(version, str) and version.startswith("3.")


def running_server() -> str | None:
    """The Prefect server the CLI should use: `PREFECT_API_URL` when the environment names
    one, else a local server on port 4200 when one answers (`adit serve` starts one), else
    None (Prefect's ephemeral mode, or the server a Prefect profile names).

    A flow run against a running server starts in ~3 s; ephemeral mode starts a temporary
    server per process (~10 s) and loses late events when it stops.
    """
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        return configured
    return LOCAL_API_URL if server_healthy(LOCAL_API_URL, timeout=0.5) else None


@contextlib.contextmanager
def prefect_settings(api_url: str | None = None) -> Iterator[Any]:
    """Prefect settings for the block: no analytics on a server Prefect starts for us (its
    ephemeral server), and `api_url` as the Prefect API when given."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    updates: dict[Any, Any] = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if api_url:
        updates[PREFECT_API_URL] = api_url
    with temporary_settings(updates=updates) as settings:
        yield settings


def stop_process_group(proc: subprocess.Popen[Any], timeout: float = 15,
                       sig: int = signal.SIGTERM) -> None:
    """Stop a process we started in its own session (`start_new_session=True`, so its process
    group id is its PID) with everything in its group: `sig`, SIGKILL after `timeout` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
