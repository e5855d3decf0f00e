"""The cluster lab: a throwaway PostgreSQL, a Prefect server on it, process workers as
"machines", and the instruments that watch them (slot sampler, lease files, process trees).

Everything runs on 127.0.0.1, in its own session, and is stopped by the PID we started.
PostgreSQL refuses to run as root: when the tests run as root, its processes run as the
`postgres` user (Debian's package creates it) from a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adit_tasks.lab.servers import free_port, port_open
from flows.runtime import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
          timeout: float = 20) -> None:
    """Stop a process we started in its own session, with its process group."""
    if proc is not None:
        stop_process_group(proc, timeout, sig)


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries Debian's `postgresql` package installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth: loopback only)."""

    def __init__(self) -> None:
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package `postgresql`; "
                               "`make test-cluster` installs it)")
        self.bindir = bindir
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="adit-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if self.as_postgres:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)

    def _user(self) -> dict[str, Any]:
        return {"user": "postgres", "group": "postgres"} if self.as_postgres else {}

    def start(self) -> PostgresServer:
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-instructions"],
                       cwd=self.dir, check=True, capture_output=True, **self._user())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
                 "-c", "fsync=off", "-c", "synchronous_commit=off"],
                cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **self._user())
        deadline = time.monotonic() + 60
        while subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                              str(self.port)], capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start:\n{_log_tail(self.log)}")
            time.sleep(0.2)
        return self

    def url(self, user: str, password: str, database: str) -> str:
        return f"postgresql+asyncpg://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class PrefectServer:
    """`prefect server start` on PostgreSQL with the production settings of
    deployments/systemd/prefect-server.env (filesystem lease storage, a quick expiry sweep)."""

    def __init__(self, home: Path, database_url: str, **extra_env: str) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.env = {**os.environ, **QUIET, "PREFECT_HOME": str(home),
                    "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
                    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE":
                        "prefect.server.concurrency.lease_storage.filesystem",
                    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
                    "PREFECT_UI_API_URL": self.url, **extra_env}
        self.env.pop("PREFECT_API_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def lease_dir(self) -> Path:
        return self.home / "concurrency_leases"

    def start(self, timeout: float = 180) -> PrefectServer:
        from flows.runtime import server_healthy

        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not server_healthy(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Prefect server did not start:\n{_log_tail(self.log)}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, timeout=30)
        self.proc = None

    def leases(self) -> dict[str, dict[str, Any]]:
        """The lease files of the filesystem lease storage, by lease id."""
        found = {}
        for path in self.lease_dir.glob("*.json"):
            if path.name == "expirations.json":
                continue
            with contextlib.suppress(OSError, ValueError):
                found[path.stem] = json.loads(path.read_text())
        return found


def _reset_sigint() -> None:
    # A background process of a non-interactive shell ignores SIGINT, and Prefect's worker
    # turns SIGTERM into SIGINT: restore the default so the worker stops when told.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def children_of(pid: int) -> list[int]:
    """Every descendant of a process (from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def flow_run_of(pid: int) -> str | None:
    """The flow run a flow-run process runs (the worker hands it PREFECT__FLOW_RUN_ID)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"PREFECT__FLOW_RUN_ID="):
            return item.split(b"=", 1)[1].decode()
    return None


@dataclass
class Machine:
    """A worker machine: `prefect worker start --limit N` in its own session and folder."""

    name: str
    folder: Path
    env: dict[str, str]
    limit: int = 2
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Machine:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "worker.log", "ab") as log:
            self.proc = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", "adit", "--limit", str(self.limit),
                 "--name", self.name],
                env={**self.env, "PREFECT_HOME": str(self.folder / ".prefect")},
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=_reset_sigint, start_new_session=True)
        return self

    def flow_run_processes(self) -> dict[int, str]:
        """PID -> flow run id of the flow-run processes this worker started."""
        if self.proc is None:
            return {}
        return {pid: run for pid in children_of(self.proc.pid)
                if (run := flow_run_of(pid)) is not None}

    def kill(self) -> tuple[list[int], dict[int, str]]:
        """The machine dies: SIGKILL to the worker and every process it started (each flow
        run runs in a session of its own), by PID. Returns the PIDs and the flow runs."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)  # it starts nothing new while we look
        pids = children_of(self.proc.pid)
        runs = {pid: run for pid in pids if (run := flow_run_of(pid)) is not None}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return [self.proc.pid, *pids], runs

    def stop(self) -> None:
        if self.proc is None:
            return
        leftovers = children_of(self.proc.pid) if self.proc.poll() is None else []
        _stop(self.proc, signal.SIGTERM, timeout=20)
        for pid in leftovers:  # flow runs still going (their own sessions)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _tcp_established() -> list[tuple[int, int, str]]:
    """(local port, remote port, socket inode) of every ESTABLISHED TCP connection."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                parts = line.split()
                if parts[3] == "01":
                    found.append((int(parts[1].rsplit(":", 1)[1], 16),
                                  int(parts[2].rsplit(":", 1)[1], 16), parts[9]))
    return found


def established(port: int) -> int:
    """Open TCP connections to a local listening port (server side, ESTABLISHED)."""
    return sum(1 for local, _, _ in _tcp_established() if local == port)


def associations_of(pid: int, ports: set[int]) -> int:
    """Open TCP connections of one process to any of these (PACS) ports: a study holds a slot
    of a node while it has an association with it."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return sum(1 for _, remote, inode in _tcp_established()
               if remote in ports and inode in inodes)


@dataclass
class SlotSampler:
    """Every `interval` s: `active_slots` of each limit (Prefect API) and the open
    associations at each PACS port. Keeps the maxima and the time series."""

    api_url: str
    limits: list[str]
    ports: dict[str, int]
    interval: float = 0.2
    max_slots: dict[str, int] = field(default_factory=dict)
    max_connections: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="slot-sampler")

    def __enter__(self) -> SlotSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.api_url.rstrip("/") + "/", timeout=5) as http:
            while not self._stop.is_set():
                sample: dict[str, int] = {}
                for name in self.limits:
                    try:
                        response = http.get(f"v2/concurrency_limits/{name}")
                    except httpx.HTTPError:
                        self.errors += 1
                        continue
                    if response.status_code == 200:
                        sample[name] = int(response.json()["active_slots"])
                        self.max_slots[name] = max(self.max_slots.get(name, 0), sample[name])
                for label, port in self.ports.items():
                    sample[label] = established(port)
                    self.max_connections[label] = max(self.max_connections.get(label, 0),
                                                      sample[label])
                self.samples.append((time.monotonic(), sample))
                self._stop.wait(self.interval)


def wait_for(condition: Any, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


__all__ = ["QUIET", "ROOT", "Machine", "PostgresServer", "PrefectServer", "SlotSampler",
           "associations_of", "established", "port_open", "wait_for"]
