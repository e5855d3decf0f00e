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

The local server: the first CLI command that runs a flow with no server named or answering
starts `prefect server start` on 127.0.0.1 as a detached process in its own session
(`start_local_server`) and records it in `adit-server.json` in the Prefect home (`PREFECT_HOME`,
else `~/.prefect`: the SQLite database `prefect.db` there is the one `adit serve` and
`prefect server start` use too); its log is `adit-server.log` next to it. Later commands find
it by that file; `adit server stop` stops exactly that process group, after checking that the
recorded PID still is that server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PORT = 4200


def local_port() -> int:
    """The local server's port: Prefect's `PREFECT_SERVER_API_PORT` from the environment (the
    default port of `prefect server start`), else 4200."""
    return int(os.environ.get("PREFECT_SERVER_API_PORT") or DEFAULT_PORT)


def local_api_url(port: int | None = None) -> str:
    return f"http://127.0.0.1:{local_port() if port is None else port}/api"


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
    """The Prefect server the CLI should use, without starting one: `PREFECT_API_URL` when
    the environment names one, else the recorded local server (`adit-server.json`), else a
    server on the local port (`local_port`, 4200) when one answers (`adit serve`), else None.

    A flow run against a running server starts in ~1 s; Prefect's ephemeral mode starts a
    temporary server per process (~10 s) and loses late events when it stops.
    """
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        return configured
    recorded = local_server()
    if recorded is not None and server_healthy(recorded.api_url, timeout=0.5):
        return recorded.api_url
    return local_api_url() if server_healthy(local_api_url(), timeout=0.5) else None


def server_for_flows(start: bool = True) -> str | None:
    """The Prefect server a command that runs flows uses: the one Prefect's settings name
    (environment, `.env`, profile), else a running local one (`running_server`), else (with
    `start`) the local server started now and kept for later commands. None: Prefect's
    ephemeral mode (a temporary server of this process)."""
    from prefect.settings import PREFECT_API_URL

    configured = PREFECT_API_URL.value()
    if configured:
        return configured
    found = running_server()
    if found is not None or not start:
        return found
    return start_local_server().api_url


# ------------------------------------------------------------------ the local server

STATE_FILE = "adit-server.json"
LOG_FILE = "adit-server.log"
LOCK_FILE = "adit-server.lock"
START_TIMEOUT = 120.0  # a new SQLite database takes ~10-15 s on 2 busy cores


class ServerError(RuntimeError):
    """The local server could not be started or stopped; the message says why."""


@dataclass(frozen=True)
class LocalServer:
    """The local Prefect server a CLI command started, as recorded in its state file."""

    pid: int  # also its process group id: it runs in its own session
    port: int
    home: Path

    @property
    def api_url(self) -> str:
        return local_api_url(self.port)

    @property
    def log(self) -> Path:
        return self.home / LOG_FILE


def prefect_home() -> Path:
    """Where the local server keeps its database, log and state file: `PREFECT_HOME` from
    the environment, else Prefect's default `~/.prefect` (read without importing Prefect)."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def local_server(home: Path | None = None) -> LocalServer | None:
    """The recorded local server, if its state file names a live process that is still that
    server (a stale or foreign PID yields None; `stop_local_server` removes the file)."""
    server = _recorded(home or prefect_home())
    return server if server is not None and _is_our_server(server) else None


def _recorded(home: Path) -> LocalServer | None:
    try:
        data = json.loads((home / STATE_FILE).read_text())
        return LocalServer(int(data["pid"]), int(data["port"]), home)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_our_server(server: LocalServer) -> bool:
    """Whether the PID is alive, leads its own process group and runs `prefect server start`
    on the recorded port (after a reboot the PID may belong to anything)."""
    if not _alive(server.pid):
        return False
    try:
        args = Path(f"/proc/{server.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        group = os.getpgid(server.pid)
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in args]
    return group == server.pid and words[1:] == prefect_server_command(server.port)[1:]


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it was our child (else a zombie looks alive)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One command at a time decides whether to start the server (two commands started at
    once must not start two)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prefect_server_command(port: int) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
            "--port", str(port)]


def start_prefect_server(port: int, log: Path, home: Path | None = None) -> subprocess.Popen[bytes]:
    """A Prefect server (SQLite in its Prefect home) bound to 127.0.0.1 only, in its own
    session (stopped with its process group), without analytics; output appended to `log`."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_UI_API_URL": local_api_url(port)}
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(prefect_server_command(port), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def wait_healthy(proc: subprocess.Popen[Any], api_url: str, log: Path,
                 timeout: float = START_TIMEOUT) -> None:
    """Until the server answers; ServerError (and the server stopped) if it exits or does
    not answer in time."""
    deadline = time.monotonic() + timeout
    while not server_healthy(api_url, timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise ServerError(f"the local Prefect server did not start; see {log}")
        time.sleep(0.2)


def start_local_server(home: Path | None = None, port: int | None = None,
                       timeout: float = START_TIMEOUT) -> LocalServer:
    """The recorded local server, started now unless it runs: detached (its own session, so
    it outlives this command and a Ctrl-C in its terminal), on `port` (default `local_port`)
    or a free one when something else holds that port; recorded in the state file once it
    answers. ServerError when it does not start (its log says why)."""
    home = home or prefect_home()
    port = local_port() if port is None else port
    with _locked(home):
        running = local_server(home)
        if running is not None and server_healthy(running.api_url):
            return running
        if not _port_free(port):
            port = _free_port()
        log = home / LOG_FILE
        proc = start_prefect_server(port, log, home)
        wait_healthy(proc, local_api_url(port), log, timeout)
        server = LocalServer(proc.pid, port, home)
        state = home / STATE_FILE
        state.with_suffix(".tmp").write_text(json.dumps({"pid": proc.pid, "port": port}))
        state.with_suffix(".tmp").replace(state)
        proc.returncode = 0  # detached on purpose: no "still running" warning at our exit
        return server


def stop_local_server(home: Path | None = None, timeout: float = 15) -> LocalServer | None:
    """Stop the recorded local server's process group (SIGTERM, SIGKILL after `timeout` s)
    and remove its state file; the server stopped, or None when none was recorded.
    ServerError, and nothing signalled, when the recorded PID is no longer that server."""
    home = home or prefect_home()
    with _locked(home):
        server = _recorded(home)
        if server is None:
            return None
        state = home / STATE_FILE
        if not _is_our_server(server):
            state.unlink(missing_ok=True)
            if _alive(server.pid):
                raise ServerError(f"process {server.pid} is not the local Prefect server "
                                  f"(stale {state} removed, nothing stopped)")
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(server.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            while _group_alive(server.pid) and time.monotonic() < deadline + 5:
                time.sleep(0.1)
        state.unlink(missing_ok=True)
        return server


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (its leader reaped first if it is ours)."""
    _alive(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def prefect_settings(api_url: str | None = None, heartbeats: bool = True,
                     adit_logs: bool = False) -> Iterator[Any]:
    """Prefect settings for the block: no analytics on a server Prefect starts for us (its
    ephemeral server), and `api_url` as the Prefect API when given.

    `adit_logs=True` (flow runs that `adit serve` starts): the `adit_tasks` loggers go to the
    run's logs in the UI too, as in deployment runs (prefect.yaml); they carry no patient data
    (tests/test_privacy_records.py reads them).

    `heartbeats=False` (the CLI's flow runs, in its own process): no flow-run heartbeats
    unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY asks for them. Prefect's default (every 180 s)
    joins the heartbeat thread at the end of every synchronous run, which costs up to 1 s per
    command; only the cluster's automations use heartbeats, for deployment runs."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_EXTRA_LOGGERS,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    updates: dict[Any, Any] = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if api_url:
        updates[PREFECT_API_URL] = api_url
    if not heartbeats and "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    if adit_logs and "PREFECT_LOGGING_EXTRA_LOGGERS" not in os.environ:
        updates[PREFECT_LOGGING_EXTRA_LOGGERS] = "adit_tasks"
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
